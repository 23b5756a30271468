//! Any text given as `hearth.toml`: parsing never panics, and a manifest that
//! parses survives a round trip through `to_toml` unchanged.
#![no_main]

use hearth_manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(manifest) = Manifest::from_toml(text) {
        let again = Manifest::from_toml(&manifest.to_toml()).expect("a valid manifest re-parses");
        assert_eq!(again, manifest);
    }
});
