#!/usr/bin/env bash
# Guest output against a neighbour's latency: wrk on the warm `hello`
# function alone, then while a `faults` guest prints 100 MiB to stdout per
# call (`/chatty?mb=100`, one call after another), in one run on one release
# `hearth serve` with the default log level (guest lines are logged). Prints
# hello's p50/p99 both ways and the p99 ratio (flooded / alone).
#   scripts/load-chatty.sh [DURATION] [CONNECTIONS] [MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
duration="${1:-10}" connections="${2:-4}" mib="${3:-100}"
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
if [ -n "${HEARTH_BIN:-}" ]; then
  hearth="$(realpath "$HEARTH_BIN")"
else
  cargo build --release --locked -p hearth-server
  hearth="${CARGO_TARGET_DIR:-target}/release/hearth"
fi
(cd functions && env -u CARGO_TARGET_DIR cargo build -q --release --locked -p hello -p faults)
wasm_dir="$PWD/functions/target/wasm32-wasip2/release"
work="$(mktemp -d)" port=18081
export HEARTH_ADMIN_TOKEN="hth_chatty_$$" HEARTH_TOKEN="hth_chatty_$$" HEARTH_URL="http://127.0.0.1:$port"
"$hearth" serve --listen "127.0.0.1:$port" --data-dir "$work/data" 2>"$work/server.log" >/dev/null &
server=$! flood=""
trap 'kill $flood 2>/dev/null; kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
wait_ready "$HEARTH_URL"
for fn in hello faults; do
  mkdir -p "$work/$fn"
  printf 'name = "%s"\ncomponent = "%s/%s.wasm"\npublic = true\n' "$fn" "$wasm_dir" "$fn" >"$work/$fn/hearth.toml"
  "$hearth" deploy "$work/$fn" --no-build >/dev/null
done
p99() { # label -> prints the wrk summary, returns p99 in ms on fd 3
  wrk -t1 -c"$connections" -d"${duration}s" --latency "$HEARTH_URL/fn/default/hello/" >"$work/wrk.txt"
  echo "== hello, $1: $(grep Requests/sec "$work/wrk.txt"), $(grep -E '^\s+50%' "$work/wrk.txt" | xargs), $(grep -E '^\s+99%' "$work/wrk.txt" | xargs)"
  grep -E '^\s+99%' "$work/wrk.txt" | awk '{ v = $2; if (v ~ /us$/) v = v / 1000; else if (v ~ /ms$/) v = v + 0; else if (v ~ /s$/) v = v * 1000; print v }' >&3
}
exec 3>"$work/p99"
p99 "alone"
(while true; do curl -s -o /dev/null "$HEARTH_URL/fn/default/faults/chatty?mb=$mib"; done) &
flood=$!
# Wait for the first flood call to finish, so the flood is in full swing.
until grep -q 'hearth::guest' "$work/server.log"; do sleep 0.2; done
p99 "while faults prints $mib MiB per call"
kill $flood; wait $flood 2>/dev/null || true
dropped="$(curl -s -H "Authorization: Bearer $HEARTH_TOKEN" "$HEARTH_URL/metrics" | awk '/^hearth_guest_output_dropped_total/ { print $2 }')"
echo "guest lines logged: $(grep -c 'hearth::guest' "$work/server.log"), dropped (hearth_guest_output_dropped_total): ${dropped:-0}"
awk 'NR == 1 { a = $1 } NR == 2 { b = $1 } END { printf "p99 flooded / alone: %.2f\n", b / a }' "$work/p99"
