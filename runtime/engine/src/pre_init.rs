//! Pre-initialisation at deploy: run a component's start-up once and compile
//! a snapshot of its state, so every fresh instance starts where start-up
//! left it.
//!
//! A component opts in by exporting [`INIT_EXPORT`] (the guest SDK's
//! `handler!` does). The export runs with every import trapping except
//! `wasi:random` (real entropy, drawn once per deploy: hash maps built at
//! start-up get keys of their own, shared by that deploy's instances);
//! `wasmtime-wizer` then rewrites the component with its memories and
//! globals as they were after the call, without the export. Anything that
//! goes wrong (a trap, an import, something wizer cannot snapshot) leaves
//! the component as it was, with the reason in [`StartUp::Plain`].

use std::time::Duration;

use wasmtime::component::{Component, Instance, Linker, WasmList};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wizer::{ComponentInstanceState, Wizer};

use crate::EPOCH_TICK;

/// The component export pre-initialisation calls: `func()`, no imports.
pub const INIT_EXPORT: &str = "hearth-pre-init";

/// Longest a component's pre-initialisation may run.
const INIT_DEADLINE: Duration = Duration::from_secs(10);
/// Most linear memory a component's pre-initialisation may grow to (a
/// deploy runs guest code: it must not take the server's memory).
const INIT_MEMORY_BYTES: usize = 512 << 20;

/// How a component's fresh instances start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartUp {
    /// From the snapshot taken after [`INIT_EXPORT`] ran at deploy.
    Snapshot,
    /// From scratch, as built; the reason says why there is no snapshot.
    Plain {
        /// Why: no [`INIT_EXPORT`], or what failed.
        reason: String,
    },
}

/// `wasm` pre-initialised, or `wasm` itself with the reason it could not be.
pub(crate) fn pre_initialise(engine: &Engine, wasm: &[u8]) -> (Option<Vec<u8>>, StartUp) {
    if !exports_init(wasm) {
        let reason = format!("the component does not export `{INIT_EXPORT}` (the guest SDK's `handler!` adds it)");
        return (None, StartUp::Plain { reason });
    }
    // Wizer asserts (panics) on components it cannot rewrite; that is this
    // component's failure, not the deploy's. The snapshot needs no reactor
    // (deadlines come from the epoch thread), so a plain executor runs it,
    // on whatever thread compiles (a tokio runtime inside another panics).
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        futures::executor::block_on(snapshot(engine, wasm))
    }));
    let reason = match outcome {
        Ok(Ok(snapshot)) => return (Some(snapshot), StartUp::Snapshot),
        Ok(Err(err)) => one_line(&err),
        Err(panic) => panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("the snapshot could not be written")
            .to_owned(),
    };
    let reason = format!("pre-initialisation failed: {reason}");
    (None, StartUp::Plain { reason })
}

/// `err` and its causes on one line, without the wasm backtraces traps
/// carry (a deploy prints the reason on one line).
fn one_line(err: &wasmtime::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let first = text.lines().next().unwrap_or_default().trim_end_matches(':').trim();
        // wasmtime's context line for a trap says nothing on its own.
        let noise = first.starts_with("error while executing at wasm backtrace");
        if !first.is_empty() && !noise && !parts.iter().any(|part| part.contains(first)) {
            parts.push(first.to_owned());
        }
    }
    parts.join(": ")
}

/// Whether the outer component exports [`INIT_EXPORT`] (nested components'
/// and modules' exports do not count).
fn exports_init(wasm: &[u8]) -> bool {
    use wasmparser::{Parser, Payload};
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(wasm) {
        match payload {
            Ok(Payload::ModuleSection { .. } | Payload::ComponentSection { .. }) => depth += 1,
            Ok(Payload::End(_)) => depth = depth.saturating_sub(1),
            Ok(Payload::ComponentExportSection(exports)) if depth == 0 => {
                if exports
                    .into_iter()
                    .flatten()
                    .any(|export| export.name.name == INIT_EXPORT)
                {
                    return true;
                }
            }
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

async fn snapshot(engine: &Engine, wasm: &[u8]) -> wasmtime::Result<Vec<u8>> {
    let mut wizer = Wizer::new();
    // Kept: the core function stays lifted by the component, and calling it
    // again on a live instance only repeats the start-up it snapshots.
    wizer.init_func(INIT_EXPORT).keep_init_func(true);
    let (cx, instrumented) = wizer.instrument_component(wasm)?;
    let component = Component::new(engine, &instrumented)?;

    let mut linker = Linker::<StoreLimits>::new(engine);
    add_random(&mut linker, &component)?;
    linker.define_unknown_imports_as_traps(&component)?;

    let limits = StoreLimitsBuilder::new().memory_size(INIT_MEMORY_BYTES).build();
    let mut store = Store::new(engine, limits);
    store.limiter(|limits| limits);
    store.set_epoch_deadline((INIT_DEADLINE.as_millis() / EPOCH_TICK.as_millis()) as u64);
    let instance = linker.instantiate_async(&mut store, &component).await?;
    let init = instance.get_typed_func::<(), ()>(&mut store, INIT_EXPORT)?;
    init.call_async(&mut store, ()).await?;

    let mut state = Exports {
        store: &mut store,
        instance,
    };
    wizer.snapshot_component(&cx, &mut state).await
}

/// Defines the `wasi:random` functions `component` imports, with real
/// entropy (start-up code seeding a hash map asks for it).
fn add_random(linker: &mut Linker<StoreLimits>, component: &Component) -> wasmtime::Result<()> {
    let engine = linker.engine().clone();
    for (name, _) in component.component_type().imports(&engine) {
        let Some(interface) = name.split('@').next() else {
            continue;
        };
        match interface {
            "wasi:random/random" => {
                let mut instance = linker.instance(name)?;
                instance.func_wrap("get-random-bytes", |_, (len,): (u64,)| Ok((random_bytes(len),)))?;
                instance.func_wrap("get-random-u64", |_, (): ()| Ok((rand::random::<u64>(),)))?;
            }
            "wasi:random/insecure" => {
                let mut instance = linker.instance(name)?;
                instance.func_wrap("get-insecure-random-bytes", |_, (len,): (u64,)| {
                    Ok((random_bytes(len),))
                })?;
                instance.func_wrap("get-insecure-random-u64", |_, (): ()| Ok((rand::random::<u64>(),)))?;
            }
            "wasi:random/insecure-seed" => {
                let mut instance = linker.instance(name)?;
                instance.func_wrap("insecure-seed", |_, (): ()| {
                    Ok(((rand::random::<u64>(), rand::random::<u64>()),))
                })?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn random_bytes(len: u64) -> Vec<u8> {
    let mut bytes = vec![0; len.min(1 << 20) as usize];
    rand::fill(&mut bytes[..]);
    bytes
}

/// Reads the instrumented component's state through the accessor functions
/// wizer's instrumentation exported.
struct Exports<'a> {
    store: &'a mut Store<StoreLimits>,
    instance: Instance,
}

impl Exports<'_> {
    async fn call<R>(&mut self, instance: &str, func: &str) -> R
    where
        R: wasmtime::component::Lift + wasmtime::component::ComponentType + Send + Sync + 'static,
    {
        let (_, outer) = self
            .instance
            .get_export(&mut *self.store, None, instance)
            .unwrap_or_else(|| panic!("wizer's instrumentation exports `{instance}`"));
        let (_, index) = self
            .instance
            .get_export(&mut *self.store, Some(&outer), func)
            .unwrap_or_else(|| panic!("wizer's instrumentation exports `{instance}#{func}`"));
        let func = self
            .instance
            .get_typed_func::<(), (R,)>(&mut *self.store, index)
            .expect("wizer's accessors have the types it asks for");
        let (value,) = func
            .call_async(&mut *self.store, ())
            .await
            .expect("an accessor does not trap");
        value
    }
}

impl ComponentInstanceState for Exports<'_> {
    async fn call_func_ret_list_u8(&mut self, instance: &str, func: &str, contents: impl FnOnce(&[u8]) + Send) {
        let list: WasmList<u8> = self.call(instance, func).await;
        contents(list.as_le_slice(&*self.store));
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.call(instance, func).await
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.call(instance, func).await
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.call::<f32>(instance, func).await.to_bits()
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.call::<f64>(instance, func).await.to_bits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_outer_components_exports_count() {
        let inner_only = wat_component(
            r#"(component
                (component $c (core module $m (func (export "f")))
                  (core instance $i (instantiate $m))
                  (func (export "hearth-pre-init") (canon lift (core func $i "f"))))
                (instance $x (instantiate $c)))"#,
        );
        assert!(!exports_init(&inner_only));
        let outer = wat_component(
            r#"(component
                (core module $m (func (export "f")))
                (core instance $i (instantiate $m))
                (func (export "hearth-pre-init") (canon lift (core func $i "f"))))"#,
        );
        assert!(exports_init(&outer));
    }

    /// A component whose `hearth-pre-init` runs `body` on one page of memory.
    fn init_running(body: &str) -> Vec<u8> {
        wat_component(&format!(
            r#"(component
                (core module $m
                  (memory (export "memory") 1)
                  (global $g (mut i32) (i32.const 0))
                  (func (export "init") {body}))
                (core instance $i (instantiate $m))
                (func (export "hearth-pre-init") (canon lift (core func $i "init"))))"#
        ))
    }

    #[test]
    fn an_init_that_runs_within_its_bounds_is_snapshotted_and_one_that_does_not_is_not() {
        let engine = Engine::default();
        let (snapshot, start_up) = pre_initialise(&engine, &init_running("(global.set $g (i32.const 42))"));
        assert_eq!(start_up, StartUp::Snapshot);
        assert!(snapshot.is_some());

        // 9,000 pages is 576 MiB: past what a deploy may take.
        let grows = init_running("(if (i32.eq (memory.grow (i32.const 9000)) (i32.const -1)) (then unreachable))");
        let (snapshot, start_up) = pre_initialise(&engine, &grows);
        assert!(snapshot.is_none());
        // Refused when it grows (the init traps on the failed grow), not
        // later when wizer tries to copy the memory out.
        assert!(
            matches!(&start_up, StartUp::Plain { reason } if reason.contains("unreachable")),
            "{start_up:?}"
        );
    }

    fn wat_component(text: &str) -> Vec<u8> {
        Component::new(&Engine::default(), text).expect("valid");
        wat::parse_str(text).expect("wat")
    }
}
