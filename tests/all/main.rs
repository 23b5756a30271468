//! Integration tests: each starts the real `hearth` binary on 127.0.0.1 with
//! a fresh data directory and talks to it over real HTTP, with the CLI, the
//! SDK, or plain reqwest. One test binary (as Wasmtime's `tests/all`), so the
//! binary and the guests build once.

mod server;

mod asynchronous;
mod billing;
mod caching;
mod cluster;
mod crash;
mod deploy;
mod errors;
mod faults;
mod inference;
mod lifecycle;
mod limits;
mod observability;
mod ocr;
mod packaging;
mod python_handler;
mod rollouts;
mod sandbox;
mod scaling;
mod telemetry;
mod tokens;
mod usage;
