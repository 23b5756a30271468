#!/usr/bin/env bash
# Metering's cost: `echo` requests per second on two release servers side by
# side, one writing usage records (the default, `process` durability: each
# answer completes once its record is in the journal, which is fsynced at
# least every 10 ms) and one with --no-metering; wrk alternates between
# them, two rounds each. scripts/load-compare.sh does the same for `hello`
# with more configurations and rounds, and each ratio's range.
#   scripts/load-metering.sh [DURATION] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
duration="${1:-10}"
connections="${2:-32}"
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }

cargo build --release --locked -p hearth-server
(cd functions && env -u CARGO_TARGET_DIR cargo build --release --locked -p echo)
hearth="${CARGO_TARGET_DIR:-target}/release/hearth"
work="$(mktemp -d)"
export HEARTH_ADMIN_TOKEN="hth_load_$$" HEARTH_TOKEN="hth_load_$$"
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$work/echo"
printf 'name = "echo"\ncomponent = "%s/functions/target/wasm32-wasip2/release/echo.wasm"\npublic = true\n' "$PWD" >"$work/echo/hearth.toml"
start() { # port extra-flags...
  local port=$1; shift
  HEARTH_LOG=warn "$hearth" serve --listen "127.0.0.1:$port" --data-dir "$work/data-$port" "$@" >/dev/null &
  pids+=($!)
  wait_ready "http://127.0.0.1:$port"
  HEARTH_URL="http://127.0.0.1:$port" "$hearth" deploy "$work/echo" --no-build >/dev/null
}
start 18090
start 18091 --no-metering
printf 'wrk.method = "POST"\nwrk.body = "twelve bytes"\n' >"$work/post.lua"

for round in 1 2; do
  for port in 18091 18090; do
    label="metering off"; [ "$port" = 18090 ] && label="usage records"
    echo "== round $round, $label: wrk -t2 -c$connections -d${duration}s"
    wrk -t2 -c"$connections" -d"${duration}s" --latency -s "$work/post.lua" "http://127.0.0.1:$port/fn/default/echo/load" |
      grep -E "Requests/sec|^\s+(50|99)%|Non-2xx|Socket errors" || true
  done
done
records=$(HEARTH_URL="http://127.0.0.1:18090" "$hearth" usage export --format jsonl | wc -l)
echo "records written by the metered server: $records"
