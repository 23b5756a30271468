#!/usr/bin/env bash
# The Python handler against the Rust one, on one release server:
#   - deploy time of py-classify (upload + compile), against `wasmtime
#     compile` of the same component, plain and with epoch interruption (the
#     codegen Hearth uses: its deadlines need it), ROUNDS alternating rounds,
#     each on new content (a custom section appended) so that every deploy
#     compiles: on a server whose code cache holds the interpreter's
#     function bodies (an earlier Python deploy put them there), and on one
#     without a code cache (`--code-cache-mb 0`: a node's first deploy);
#   - cold start (first call of a fresh version: a new instance, the model
#     already warm; for Python, the interpreter's snapshot is instantiated)
#     and warm latency (median of sequential calls), py-classify and classify;
#   - memory per instance (the linear memory peak its usage records keep).
#   scripts/py-handler-bench.sh [CALLS] [ROUNDS=3]
# Knobs: HEARTH_BIN=PATH (else a release build).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
calls="${1:-200}" rounds="${2:-3}"
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
bare_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
HEARTH_ADMIN_TOKEN="$token" HEARTH_LOG=warn "$hearth" serve --listen "127.0.0.1:$bare_port" --data-dir "$work/bare" \
  --code-cache-mb 0 >/dev/null 2>"$work/bare-log" &
bare_pid=$!
trap 'kill $pid $bare_pid 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
wait_ready "$url"
wait_ready "http://127.0.0.1:$bare_port"
export HEARTH_URL="$url" HEARTH_TOKEN="$token"
ms() { python3 -c "import sys; print(f'{float(sys.argv[1]) * 1000:.2f}')" "$1"; }
input="$work/input.json"
python3 -c 'import json; print(json.dumps({"input": [((i * 37) % 255) / 255 for i in range(784)]}))' >"$input"

# Each round deploys (and `wasmtime compile`s) its own copy of the
# component: a custom section appended makes it new content.
mkdir "$work/py"
sed -e 's|^component = .*|component = "py.wasm"|' \
    -e "s|^path = \"\\.\\./classify/|path = \"$PWD/functions/classify/|" \
    functions/py-classify/hearth.toml >"$work/py/hearth.toml"
tagged() {
  python3 - "$1" "$2" "$3" <<'EOT'
import sys
src, dst, tag = sys.argv[1], sys.argv[2], sys.argv[3].encode()
name = b"hearth-bench"
payload = bytes([len(name)]) + name + tag
size, leb = len(payload), bytearray()
while True:
    byte, size = size & 0x7F, size >> 7
    leb.append(byte | (0x80 if size else 0))
    if not size:
        break
open(dst, "wb").write(open(src, "rb").read() + b"\x00" + bytes(leb) + payload)
EOT
}
timed_ms() { local start=$(date +%s%N); "$@" >/dev/null; echo $(( ($(date +%s%N) - start) / 1000000 )); }
: >"$work/deploy" >"$work/bare.ms" >"$work/plain" >"$work/epoch"
# The cached server's first deploy fills its code cache.
tagged functions/py-classify/build/py-classify.wasm "$work/py/py.wasm" "warm-up $$"
filling_ms="$(timed_ms "$hearth" deploy "$work/py" --no-build)"
for round in $(seq 1 "$rounds"); do
  tagged functions/py-classify/build/py-classify.wasm "$work/py/py.wasm" "round $round $$"
  timed_ms "$hearth" deploy "$work/py" --no-build >>"$work/deploy"
  HEARTH_URL="http://127.0.0.1:$bare_port" timed_ms "$hearth" deploy "$work/py" --no-build >>"$work/bare.ms"
  if [ -n "$wasmtime" ]; then
    timed_ms "$wasmtime" compile -o "$work/plain.cwasm" "$work/py/py.wasm" >>"$work/plain"
    timed_ms "$wasmtime" compile -W epoch-interruption=y -o "$work/epoch.cwasm" "$work/py/py.wasm" >>"$work/epoch"
  fi
done
median_of() { sort -n "$1" | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
deploy_ms="$(median_of "$work/deploy")" bare_ms="$(median_of "$work/bare.ms")"
if [ -n "$wasmtime" ]; then
  plain_ms="$(median_of "$work/plain")" epoch_ms="$(median_of "$work/epoch")"
  ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
  echo "deploy py-classify (medians of $rounds rounds): wasmtime compile $plain_ms ms, wasmtime compile -W epoch-interruption=y $epoch_ms ms"
  echo "  code cache warm: $deploy_ms ms (rounds: $(paste -sd' ' "$work/deploy")), ratios $(ratio "$deploy_ms" "$plain_ms") / $(ratio "$deploy_ms" "$epoch_ms")"
  echo "  filling an empty code cache (one deploy): $filling_ms ms, ratios $(ratio "$filling_ms" "$plain_ms") / $(ratio "$filling_ms" "$epoch_ms")"
  echo "  no code cache:   $bare_ms ms (rounds: $(paste -sd' ' "$work/bare.ms")), ratios $(ratio "$bare_ms" "$plain_ms") / $(ratio "$bare_ms" "$epoch_ms")"
else
  echo "deploy py-classify: $deploy_ms ms with the code cache warm, $bare_ms ms without (no wasmtime CLI for the reference)"
fi
"$hearth" deploy functions/classify --no-build >/dev/null
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
