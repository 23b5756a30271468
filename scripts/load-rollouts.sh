#!/usr/bin/env bash
# Rollout and cache figures on one release `hearth serve`, side by side in
# one run (wrk on loopback, DURATION seconds per row):
#   - the response cache: `echo` with `[cache]` answering a repeated GET
#     from memory (every request a hit) against the same `echo` without a
#     cache (every request a warm run);
#   - shadow traffic: `svc@1` (hello, called by version) against `svc@prod`
#     (the same version 1, with every request copied to version 2, which
#     traps) and `svc@slow` (version 1, 10 % copied to version 3, which
#     sleeps past its 1 s deadline): the primary's latency with and without
#     copies.
#   scripts/load-rollouts.sh [DURATION] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
duration="${1:-10}" connections="${2:-8}"
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
if [ -n "${HEARTH_BIN:-}" ]; then
  hearth="$(realpath "$HEARTH_BIN")"
else
  cargo build --release --locked -p hearth-server
  hearth="${CARGO_TARGET_DIR:-target}/release/hearth"
fi
(cd functions && env -u CARGO_TARGET_DIR cargo build -q --release --locked -p hello -p echo -p faults)
wasm="$PWD/functions/target/wasm32-wasip2/release"
work="$(mktemp -d)" port=18082
export HEARTH_ADMIN_TOKEN="hth_rollouts_$$" HEARTH_TOKEN="hth_rollouts_$$" HEARTH_URL="http://127.0.0.1:$port"
HEARTH_LOG=warn "$hearth" serve --listen "127.0.0.1:$port" --data-dir "$work/data" >/dev/null 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
wait_ready "$HEARTH_URL"
deploy() { # name component [manifest lines]
  mkdir -p "$work/$1-$2"
  printf 'name = "%s"\ncomponent = "%s/%s.wasm"\npublic = true\n%b' "$1" "$wasm" "$2" "${3:-}" >"$work/$1-$2/hearth.toml"
  "$hearth" deploy "$work/$1-$2" --no-build >/dev/null
}
deploy echo echo
deploy cached echo '[cache]\nttl_s = 3600\n'
deploy svc hello
deploy svc faults
deploy svc faults '[limits]\ntimeout_ms = 1000\n'
"$hearth" alias set svc prod 1 --shadow 2=100 >/dev/null
"$hearth" alias set svc slow 1 --shadow 3=10 >/dev/null
row() { # label url
  wrk -t"$(( connections < 2 ? 1 : 2 ))" -c"$connections" -d"${duration}s" --latency "$2" >"$work/wrk.txt"
  printf '%-58s %10s req/s   p50 %8s   p99 %8s\n' "$1" "$(awk '/Requests\/sec/ { print $2 }' "$work/wrk.txt")" \
    "$(awk '$1 == "50%" { print $2 }' "$work/wrk.txt")" "$(awk '$1 == "99%" { print $2 }' "$work/wrk.txt")"
}
row "echo, warm run (no cache)" "$HEARTH_URL/fn/default/echo/same?x=1"
row "echo, [cache] hit" "$HEARTH_URL/fn/default/cached/same?x=1"
row "svc@1 (hello), no shadow" "$HEARTH_URL/fn/default/svc@1/trap"
row "svc@prod (hello), 100 % copied to a trapping version" "$HEARTH_URL/fn/default/svc@prod/trap"
row "svc@1 (hello), no shadow, again" "$HEARTH_URL/fn/default/svc@1/sleep?ms=5000"
row "svc@slow (hello), 10 % copied to a version past its deadline" "$HEARTH_URL/fn/default/svc@slow/sleep?ms=5000"
metrics="$(curl -fsS -H "Authorization: Bearer $HEARTH_TOKEN" "$HEARTH_URL/metrics")"
echo "shadow copies run (records): $(echo "$metrics" | awk '/^hearth_rollout_invocations_total\{/ && /shadow="true"/ { n += $2 } END { print n + 0 }'), skipped at --max-shadow-runs: $(echo "$metrics" | awk '/^hearth_shadow_skipped_total/ { print $2 }')"
