//! Any request to the control API, decoded by the real router in-process
//! (axum extractors, multipart uploads, JSON bodies, queries, path names):
//! nothing panics, no input reaches a 500, and every refusal is an
//! `application/problem+json` body whose `status` matches the response.
//!
//! Input is text: a request line `METHOD /path?query`, header lines
//! `Name: value`, an empty line, then the body. Without an `Authorization`
//! header the request carries the operator's admin token.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use hearth_http::App;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const ADMIN_TOKEN: &str = "hearth_fuzz_admin_token_0123456789abcdef";

struct Server {
    runtime: tokio::runtime::Runtime,
    router: App,
    _data: tempfile::TempDir,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let data = tempfile::tempdir().expect("tempdir");
        let router = runtime.block_on(build(data.path()));
        Server {
            runtime,
            router,
            _data: data,
        }
    })
}

async fn build(data: &std::path::Path) -> App {
    let store: Arc<dyn hearth_store::Store> = Arc::new(hearth_store::SqliteStore::open(data).expect("store"));
    let blobs = hearth_store::BlobStore::open(data).expect("blobs");
    let auth = hearth_auth::Auth::new(store.clone());
    auth.bootstrap(Some(ADMIN_TOKEN)).await.expect("admin token");
    let mut config = hearth_engine::EngineConfig::new(data.join("compiled"));
    config.pooling = false;
    let nn = hearth_bridge::NnHost::new(hearth_devices::ModelCache::new(
        hearth_devices::DevicePool::cpu_only(),
        Default::default(),
    ));
    config.nn = nn.clone();
    let engine = hearth_engine::Engine::new(config).expect("engine");
    let registry =
        hearth_registry::Registry::new(store.clone(), blobs, engine.clone(), nn.clone(), data.join("assets"));
    let invoker = hearth_invoker::Invoker::new(
        hearth_invoker::Parts {
            registry,
            engine,
            nn,
            pools: hearth_invoker::Pools::new(Default::default()),
            tenants: hearth_scheduler::TenantGate::new(Default::default()),
            store,
            usage: Some(hearth_metering::UsageLog::open(data, Default::default()).expect("usage log")),
            prices: hearth_metering::PriceTable::default(),
            telemetry: Arc::new(hearth_telemetry::Telemetry::new().expect("telemetry")),
        },
        hearth_invoker::InvokerConfig {
            max_body_bytes: 64 << 10,
            queue_timeout: std::time::Duration::from_millis(100),
            ..Default::default()
        },
    );
    let state = hearth_http::AppState::new(invoker, auth, 64 << 10, None, Default::default());
    App::new(state, [hearth_control::routes(), hearth_oip::routes()])
}

/// The text form above as a request, or `None` where `http` itself refuses
/// the method, URI or a header (hyper would have refused it on the wire).
fn request(data: &[u8]) -> Option<http::Request<Body>> {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.lines();
    let (method, target) = lines.next()?.split_once(' ')?;
    let mut builder = http::Request::builder().method(method).uri(target);
    let mut authorized = false;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        authorized |= name.eq_ignore_ascii_case("authorization");
        builder = builder.header(name, value.trim());
    }
    if !authorized {
        builder = builder.header("authorization", format!("Bearer {ADMIN_TOKEN}"));
    }
    let request = builder.body(Body::from(body.to_vec())).ok()?;
    // Only the control API: `/fn/...` runs guests, covered by the test suite.
    request.uri().path().starts_with("/v1/").then_some(request)
}

fuzz_target!(|data: &[u8]| {
    let Some(request) = request(data) else { return };
    let server = server();
    let (status, content_type, body) = server.runtime.block_on(async {
        let response = server.router.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        let body = response.into_body().collect().await.map(|b| b.to_bytes());
        (status, content_type, body)
    });
    assert_ne!(status, http::StatusCode::INTERNAL_SERVER_ERROR, "{:?}", body);
    if status.is_client_error() || status.is_server_error() {
        assert_eq!(content_type.as_deref(), Some("application/problem+json"), "{status}");
        let body = body.expect("a problem body is complete");
        let problem: serde_json::Value = serde_json::from_slice(&body).expect("problem JSON");
        assert_eq!(problem["status"], status.as_u16(), "{problem}");
    }
});
