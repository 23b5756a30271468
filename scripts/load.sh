#!/usr/bin/env bash
# Load test: requests per second and latency of `echo` on a release
# `hearth serve`, driven by wrk on loopback (bounded: DURATION seconds).
#   scripts/load.sh [DURATION] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-10}"
connections="${2:-32}"
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }

cargo build --release --locked -p hearth-server
(cd functions && env -u CARGO_TARGET_DIR cargo build --release --locked -p echo -p hello)
hearth="${CARGO_TARGET_DIR:-target}/release/hearth"
data_dir="$(mktemp -d)"
port=18080
export HEARTH_ADMIN_TOKEN="hth_load_$$" HEARTH_TOKEN="hth_load_$$" HEARTH_URL="http://127.0.0.1:$port"
HEARTH_LOG=warn "$hearth" serve --listen "127.0.0.1:$port" --data-dir "$data_dir" >/dev/null &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$data_dir"' EXIT
for _ in $(seq 1 100); do curl -fsS "$HEARTH_URL/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
"$hearth" deploy functions/echo --no-build >/dev/null
"$hearth" deploy functions/hello --no-build >/dev/null

for fn in hello echo; do
  echo "== $fn: wrk -t2 -c$connections -d${duration}s (fresh instance per request)"
  wrk -t2 -c"$connections" -d"${duration}s" --latency \
    -H "Authorization: Bearer $HEARTH_TOKEN" "$HEARTH_URL/fn/default/$fn/load?x=1" |
    grep -E "Requests/sec|^\s+(50|99)%|Non-2xx|Socket errors"
done
