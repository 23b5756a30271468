#!/usr/bin/env bash
# Batching end to end: `classify` on a release `hearth serve` under CONNECTIONS
# concurrent wrk clients (each POSTing one 784-float JSON image): batching
# off (--batch-max-rows 1), the default batcher (64 rows, no waiting while a
# lane is free), and the same batcher with a 2 ms window (every call waits
# for company: the default before), side by side on the same machine.
#   scripts/load-classify.sh [DURATION=10] [CONNECTIONS=64]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
duration="${1:-10}"
connections="${2:-64}"
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }

cargo build --release --locked -q -p hearth-server
cargo run --release --locked -q -p hearth-fixtures --bin gen-models >/dev/null
(cd functions && env -u CARGO_TARGET_DIR cargo build --release --locked -q -p classify)
hearth="${CARGO_TARGET_DIR:-target}/release/hearth"
work="$(mktemp -d)"
trap 'kill -TERM $server 2>/dev/null || true; wait 2>/dev/null; rm -rf "$work"' EXIT
python3 -c 'import json; print(json.dumps({"input": [((i * 37) % 255) / 255 for i in range(784)]}))' >"$work/body.json"
cat >"$work/post.lua" <<EOT
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
local f = io.open("$work/body.json"); wrk.body = f:read("*a"); f:close()
EOT
export HEARTH_ADMIN_TOKEN="hth_load_$$" HEARTH_TOKEN="hth_load_$$"
port=18081
for mode in off on window-2ms; do
  flags=()
  [[ $mode == off ]] && flags=(--batch-max-rows 1)
  [[ $mode == window-2ms ]] && flags=(--batch-window-ms 2)
  rm -rf "$work/data"
  serve_on "$port" "$work/data" "${flags[@]}"
  "$hearth" deploy functions/classify --no-build >/dev/null
  echo "== batching $mode: wrk -t2 -c$connections -d${duration}s"
  wrk -t2 -c"$connections" -d"${duration}s" --latency -s "$work/post.lua" "$HEARTH_URL/fn/default/classify/" |
    grep -E "Requests/sec|^\s+(50|99)%|Non-2xx|Socket errors"
  "$hearth" status | grep -E 'calls in'
  stop_server
done
