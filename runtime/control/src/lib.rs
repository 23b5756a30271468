//! Hearth's control API under `/v1`, behind bearer tokens: functions and
//! the node's status ([`functions`]), versions and aliases ([`aliases`]),
//! tokens ([`tokens`]), usage exports ([`usage`]) and asynchronous
//! invocations ([`asynchronous`]).
//!
//! Its request and response bodies are `hearth-api`'s types, the ones
//! `sdk/client` uses; its errors leave through `hearth-http`'s `ApiError`,
//! like every other answer of the server.

mod aliases;
mod asynchronous;
mod functions;
mod tokens;
mod usage;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post, put};
use hearth_http::AppState;

/// The `/v1` routes, to hand to `hearth_http::App::new`.
pub fn routes() -> Router<Arc<AppState>> {
    let v1 = Router::new()
        .route(
            "/functions",
            // Uploads are limited while they stream (see `functions::deploy`),
            // not by axum's buffering default.
            post(functions::deploy)
                .get(functions::list)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/functions/{name}", get(functions::show).delete(functions::delete))
        .route("/functions/{name}/versions", get(aliases::versions))
        .route("/functions/{name}/versions/{version}", delete(aliases::delete_version))
        .route("/functions/{name}/aliases", get(aliases::list))
        .route(
            "/functions/{name}/aliases/{alias}",
            put(aliases::set).delete(aliases::unset),
        )
        .route("/functions/{name}/aliases/{alias}/history", get(aliases::history))
        .route("/functions/{name}/aliases/{alias}/rollback", post(aliases::rollback))
        .route("/status", get(functions::status))
        .route("/tokens", post(tokens::create).get(tokens::list))
        .route("/tokens/revoke", post(tokens::revoke_by_value))
        .route("/tokens/{id}", delete(tokens::revoke))
        .route("/usage", get(usage::export))
        .route("/usage/summary", get(usage::summary))
        .route("/functions/{name}/invocations", post(asynchronous::submit))
        .route("/functions/{name}/invocations/{id}", get(asynchronous::show))
        .route(
            "/functions/{name}/invocations/{id}/response",
            get(asynchronous::response),
        );
    Router::new().nest("/v1", v1)
}
