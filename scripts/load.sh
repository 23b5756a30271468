#!/usr/bin/env bash
# Load test: requests per second and latency on a release `hearth serve`,
# driven by wrk on loopback (bounded: DURATION seconds per row), side by side
# in one run:
#   - `hello` and `echo` with warm-instance reuse (the default) and with a
#     fresh instance per request (`scaling.reuse = false`);
#   - the reference, when a `wasmtime` CLI is found (PATH, or
#     ~/.cache/hearth/tools/bin from `cargo install wasmtime-cli`):
#     `wasmtime serve` on the same hello component, fresh and with
#     `--max-instance-reuse-count 1000`.
# The functions are public, as `wasmtime serve` has no tokens either. Usage
# records are on (as in production); HEARTH_LOAD_METERING=off runs the server
# with --no-metering to see the rest of the path alone.
#   scripts/load.sh [DURATION] [CONNECTIONS]
# Knobs (environment):
#   HEARTH_BIN=PATH             run this `hearth` binary instead of building one
#                               (scripts/load-ab.sh compares two this way)
#   HEARTH_LOAD_ROWS=REGEX      only the Hearth rows whose function matches
#                               (e.g. '^hello$')
#   HEARTH_LOAD_REFERENCE=off   skip the `wasmtime serve` rows
#   HEARTH_LOAD_DEFAULTS=on     the server's defaults: request log lines at the
#                               default level (info) and private functions
#                               called with a bearer token (else HEARTH_LOG=warn
#                               and public functions, like the reference)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
duration="${1:-10}"
connections="${2:-32}"
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }

if [ -n "${HEARTH_BIN:-}" ]; then
  hearth="$(realpath "$HEARTH_BIN")"
else
  cargo build --release --locked -p hearth-server
  hearth="${CARGO_TARGET_DIR:-target}/release/hearth"
fi
(cd functions && env -u CARGO_TARGET_DIR cargo build -q --release --locked -p echo -p hello)
wasm_dir="$PWD/functions/target/wasm32-wasip2/release"
work="$(mktemp -d)"
port=18080
export HEARTH_ADMIN_TOKEN="hth_load_$$" HEARTH_TOKEN="hth_load_$$" HEARTH_URL="http://127.0.0.1:$port"
metering=()
[ "${HEARTH_LOAD_METERING:-on}" = off ] && metering=(--no-metering)
defaults="${HEARTH_LOAD_DEFAULTS:-off}"
log_level=warn public=true auth=()
if [ "$defaults" = on ]; then
  log_level="${HEARTH_LOG:-info}" public=false auth=(-H "Authorization: Bearer $HEARTH_TOKEN")
fi
HEARTH_LOG="$log_level" "$hearth" serve --listen "127.0.0.1:$port" --data-dir "$work/data" "${metering[@]}" >/dev/null 2>&1 &
server=$!
reference=""
trap 'kill -TERM $server ${reference:-} 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
wait_ready "$HEARTH_URL"

for fn in hello echo; do
  for reuse in true false; do
    name="$fn"; [ "$reuse" = false ] && name="$fn-fresh"
    mkdir -p "$work/$name"
    printf 'name = "%s"\ncomponent = "%s/%s.wasm"\npublic = %s\n[scaling]\nreuse = %s\n' \
      "$name" "$wasm_dir" "$fn" "$public" "$reuse" >"$work/$name/hearth.toml"
    "$hearth" deploy "$work/$name" --no-build >/dev/null
  done
done

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
row() { # label url [wrk options]; $measured is the server's pid
  echo "== $1: wrk -t2 -c$connections -d${duration}s"
  local before out after
  before="$(cpu_ticks "$measured")"
  out="$(wrk -t2 -c"$connections" -d"${duration}s" --latency "${@:3}" "$2")"
  after="$(cpu_ticks "$measured")"
  echo "$out" | grep -E "Requests/sec|^\s+(50|99)%|Non-2xx|Socket errors" || true
  # The server's CPU time (all its threads) per request: steadier than
  # throughput on a machine whose speed drifts.
  echo "$out" | awk -v a="$before" -v b="$after" -v hz="$(getconf CLK_TCK)" \
    '/requests in/ { printf "  server CPU/request: %.1f us\n", (b - a) * 1e6 / hz / $1 }'
}
measured=$server

for fn in hello echo; do
  [[ "$fn" =~ ${HEARTH_LOAD_ROWS:-.} ]] || continue
  row "hearth $fn, fresh instance per request" "$HEARTH_URL/fn/default/$fn-fresh/load?x=1" "${auth[@]}"
  row "hearth $fn, warm instances reused" "$HEARTH_URL/fn/default/$fn/load?x=1" "${auth[@]}"
done

[ "${HEARTH_LOAD_REFERENCE:-on}" = off ] && exit 0

wasmtime="$(command -v wasmtime || true)"
[ -z "$wasmtime" ] && [ -x "$HOME/.cache/hearth/tools/bin/wasmtime" ] && wasmtime="$HOME/.cache/hearth/tools/bin/wasmtime"
if [ -z "$wasmtime" ]; then
  echo "== reference skipped: no wasmtime CLI (cargo install wasmtime-cli --version 48.0.8 --root ~/.cache/hearth/tools)"
  exit 0
fi
for reuse in 1 1000; do
  ref_port=$((port + 1))
  "$wasmtime" serve -O pooling-allocator -S cli --addr "127.0.0.1:$ref_port" \
    --max-instance-reuse-count "$reuse" "$wasm_dir/hello.wasm" >/dev/null 2>&1 &
  reference=$!
  measured=$reference
  for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$ref_port/" >/dev/null 2>&1 && break; sleep 0.1; done
  row "wasmtime serve hello, --max-instance-reuse-count $reuse" "http://127.0.0.1:$ref_port/load?x=1"
  kill -TERM "$reference"; wait "$reference" 2>/dev/null || true
  reference=""
done
