//! Hearth's guest SDK: write an inference handler in a few lines.
//!
//! A Hearth function is a `wasi:http/proxy` component, so anything built for
//! `wasmtime serve` or Spin runs unchanged. This crate is a thin layer over
//! [`wstd`] (async `wasi:http` for Rust) that adds what handlers repeat:
//! exporting the handler ([`handler!`]), reading the body, and answering with
//! JSON or text. The runtime serves a function at `/fn/{tenant}/{function}/`
//! but the guest sees paths relative to that mount; the mount itself arrives in
//! the [`BASE_PATH_HEADER`] header.
//!
//! Models deployed with the function are reached through [`nn`]:
//! `Model::load("name")?.infer(&[("input", tensor)])`.
//!
//! ```ignore
//! use hearth_guest::prelude::*;
//!
//! hearth_guest::handler!(hello);
//!
//! async fn hello(_req: Request<Body>) -> Result<Response<Body>> {
//!     Ok(text(StatusCode::OK, "hello from hearth\n"))
//! }
//! ```

pub mod nn;

/// The `hearth-pre-init` export [`handler!`] adds. At deploy the runtime
/// calls it once and snapshots the component's memory after it, so every
/// fresh instance starts from that state instead of running its start-up
/// again. It may not call any import (no I/O, no clock, no model): an
/// import traps, and the runtime then runs the component without a
/// snapshot, as it runs components that do not export this.
#[doc(hidden)]
pub mod pre_init {
    wit_bindgen::generate!({
        inline: "package hearth:guest; world pre-init { export hearth-pre-init: func(); }",
        pub_export_macro: true,
        export_macro_name: "export_pre_init",
        default_bindings_module: "hearth_guest::pre_init",
    });

    /// The pre-initialisation of a handler without an `init`: only the
    /// start-up every export runs (static constructors, runtime set-up).
    /// Growing the heap here made fresh instances slower, not faster: a
    /// larger snapshot costs more to map and reset than the growth saves.
    pub fn start_up_only() {}
}

pub use wstd;
pub use wstd::http::{Body, HeaderMap, Method, Request, Response, StatusCode};

/// Header in which the runtime passes the path the function is mounted at
/// (for example `/fn/default/echo`), so a guest can build absolute links.
pub const BASE_PATH_HEADER: &str = "x-hearth-base-path";

/// Errors a handler may return; the runtime answers them with a 500.
pub type Error = wstd::http::Error;
/// Result of a handler.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a handler usually needs, in one `use`.
pub mod prelude {
    pub use crate::{Body, HeaderMap, Method, Request, Response, Result, StatusCode, json, read_body, text};
}

/// A response with `body` serialised as JSON and `content-type: application/json`.
pub fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    // Serialising plain data structures does not fail; if a custom `Serialize`
    // does, answer 500 with the reason rather than panicking inside the guest.
    let (status, bytes) = match serde_json::to_vec(body) {
        Ok(bytes) => (status, bytes),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({ "error": err.to_string() }).to_string().into_bytes(),
        ),
    };
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", wstd::http::HeaderValue::from_static("application/json"));
    response
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut response = Response::new(Body::from(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        "content-type",
        wstd::http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Reads the whole request body into memory.
pub async fn read_body(request: &mut Request<Body>) -> Result<Vec<u8>> {
    Ok(request.body_mut().contents().await?.to_vec())
}

/// Exports an `async fn(Request<Body>) -> Result<Response<Body>>` as the
/// component's `wasi:http/incoming-handler`, and provides the `main` that a
/// `wasm32-wasip2` binary needs.
///
/// `handler!(serve, init = load_tables)` also runs `load_tables()` when the
/// component is pre-initialised at deploy (see [`pre_init`]): state it
/// leaves in memory (a `OnceLock` filled from `include_bytes!` data, say) is
/// there in every fresh instance without being computed again. It must not
/// call imports: no files, no clock, no models.
#[macro_export]
macro_rules! handler {
    ($handler:path) => {
        $crate::handler!($handler, init = $crate::pre_init::start_up_only);
    };
    ($handler:path, init = $init:path) => {
        struct __HearthPreInit;

        impl $crate::pre_init::Guest for __HearthPreInit {
            fn hearth_pre_init() {
                $init();
            }
        }

        $crate::pre_init::export_pre_init!(__HearthPreInit with_types_in $crate::pre_init);

        struct __HearthHandler;

        impl $crate::wstd::__internal::wasip2::exports::http::incoming_handler::Guest
            for __HearthHandler
        {
            fn handle(
                request: $crate::wstd::__internal::wasip2::http::types::IncomingRequest,
                response_out: $crate::wstd::__internal::wasip2::http::types::ResponseOutparam,
            ) {
                let responder = $crate::wstd::http::server::Responder::new(response_out);
                $crate::wstd::runtime::block_on(async move {
                    match $crate::wstd::http::request::try_from_incoming(request) {
                        Ok(request) => match $handler(request).await {
                            Ok(response) => {
                                // The head is already sent when the body fails;
                                // the runtime cuts the connection, nothing to add.
                                let _ = responder.respond(response).await;
                            }
                            Err(err) => responder.fail(err),
                        },
                        Err(err) => responder.fail(err),
                    }
                })
            }
        }

        $crate::wstd::__internal::wasip2::http::proxy::export!(
            __HearthHandler with_types_in $crate::wstd::__internal::wasip2
        );

        fn main() {
            unreachable!("a Hearth function is called through wasi:http/incoming-handler, not run")
        }
    };
}
