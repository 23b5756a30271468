#!/usr/bin/env bash
# Builds build/py-classify.wasm from app.py with componentize-py, in a
# virtual environment of its own (HEARTH_PY_VENV, default
# ~/.cache/hearth/componentize-py). The WASI WIT comes from the
# wasmtime-wasi-http crate in cargo's registry (the version Hearth links),
# wasi-nn from ../../wit.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${HEARTH_PY_VENV:-$HOME/.cache/hearth/componentize-py}"
[ -x "$venv/bin/componentize-py" ] || {
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q componentize-py==0.25.1
}
wasi_http="$(cd "$root" && cargo metadata --format-version 1 --locked 2>/dev/null | python3 -c '
import json, sys, os
meta = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in meta["packages"] if p["name"] == "wasmtime-wasi-http"))')"
wit="$(mktemp -d)"
trap 'rm -rf "$wit"' EXIT
mkdir -p "$wit/deps/nn"
cp "$here/world.wit" "$wit/"
cp "$wasi_http"/wit/deps/*.wit "$wit/deps/"
cp "$root/wit/wasi-nn.wit" "$wit/deps/nn/"
mkdir -p "$here/build"
cd "$here"
"$venv/bin/componentize-py" -d "$wit" -w handler componentize app -o build/py-classify.wasm
