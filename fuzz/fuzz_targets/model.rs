//! Any bytes a deployer uploads as a model, parsed and prepared by the CPU
//! device as a deploy does: the answer is a prepared model or an
//! `InvalidModel` error, never a panic or an abort.
//!
//! `cargo +nightly fuzz run model` (in `fuzz/`).
#![no_main]

use hearth_devices::DevicePool;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = DevicePool::cpu_only().cpu().prepare(data);
});
