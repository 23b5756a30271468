#!/usr/bin/env bash
# The Python handler against the Rust one, on one release server:
#   - deploy time of py-classify (upload + compile), against
#     `wasmtime compile` of the same component;
#   - cold start (first call of a fresh version: a new instance, the model
#     already warm; for Python, the interpreter's snapshot is instantiated)
#     and warm latency (median of sequential calls), py-classify and classify;
#   - memory per instance (the linear memory peak its usage records keep).
#   scripts/py-handler-bench.sh [CALLS]
# Knobs: HEARTH_BIN=PATH (else a release build).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
calls="${1:-200}"
if [ -n "${HEARTH_BIN:-}" ]; then
  hearth="$(realpath "$HEARTH_BIN")"
else
  cargo build --release --locked -p hearth-server
  hearth="$(realpath "${CARGO_TARGET_DIR:-target}/release/hearth")"
fi
wasmtime="$(command -v wasmtime || true)"
[ -z "$wasmtime" ] && [ -x "$HOME/.cache/hearth/tools/bin/wasmtime" ] && wasmtime="$HOME/.cache/hearth/tools/bin/wasmtime"
(cd functions && env -u CARGO_TARGET_DIR cargo build -q --release --locked -p classify)
[ -f functions/classify/models/mnist-mlp.onnx ] || cargo run -q --locked -p hearth-fixtures --bin gen-models
functions/py-classify/build.sh >/dev/null
work="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
url="http://127.0.0.1:$port" token=hth_py_bench
HEARTH_ADMIN_TOKEN="$token" HEARTH_LOG=warn "$hearth" serve --listen "127.0.0.1:$port" --data-dir "$work/data" \
  >/dev/null 2>"$work/log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
wait_ready "$url"
export HEARTH_URL="$url" HEARTH_TOKEN="$token"
ms() { python3 -c "import sys; print(f'{float(sys.argv[1]) * 1000:.2f}')" "$1"; }
input="$work/input.json"
python3 -c 'import json; print(json.dumps({"input": [((i * 37) % 255) / 255 for i in range(784)]}))' >"$input"

start=$(date +%s%N)
"$hearth" deploy functions/py-classify --no-build >/dev/null
deploy_ms=$(( ($(date +%s%N) - start) / 1000000 ))
"$hearth" deploy functions/classify --no-build >/dev/null
if [ -n "$wasmtime" ]; then
  start=$(date +%s%N)
  "$wasmtime" compile -o "$work/py.cwasm" functions/py-classify/build/py-classify.wasm
  compile_ms=$(( ($(date +%s%N) - start) / 1000000 ))
  echo "deploy py-classify: $deploy_ms ms; wasmtime compile of the same component: $compile_ms ms; ratio $(awk -v a="$deploy_ms" -v b="$compile_ms" 'BEGIN { printf "%.2f", a / b }')"
else
  echo "deploy py-classify: $deploy_ms ms (no wasmtime CLI for the reference)"
fi
# The model both name is loaded once, by a first classify call; each
# function's first timed call then runs on a fresh instance of a fresh
# version (classify is deployed again), with the model warm.
curl -fsS -o /dev/null -H 'content-type: application/json' --data @"$input" "$url/fn/default/classify/"
"$hearth" deploy functions/classify --no-build >/dev/null
for fn in classify py-classify; do
  first="$(curl -fsS -o /dev/null -w '%{time_total}' -H 'content-type: application/json' --data @"$input" "$url/fn/default/$fn/")"
  for _ in $(seq 1 "$calls"); do
    curl -fsS -o /dev/null -w '%{time_total}\n' -H 'content-type: application/json' --data @"$input" "$url/fn/default/$fn/"
  done | sort -g >"$work/$fn.times"
  median="$(awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }' "$work/$fn.times")"
  memory="$("$hearth" usage export --function "$fn" --format jsonl 2>/dev/null \
    | python3 -c 'import json, sys; print(max(json.loads(l)["memory_peak_bytes"] for l in sys.stdin) / 2**20)')"
  echo "$fn: first call $(ms "$first") ms, warm median $(ms "$median") ms (curl, $calls sequential calls), memory per instance ${memory} MiB"
done
