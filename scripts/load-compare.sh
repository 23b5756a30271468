#!/usr/bin/env bash
# The billing benches, side by side: warm `hello` under wrk, one server per
# configuration, in alternating rounds (the order rotates each round, so a
# slow phase of the machine hits every configuration alike), at each
# connection count; then the median of each, its ratio to the first (and
# the same ratio taken round by round, its median and range: a difference
# inside that range is this machine's noise), the
# median of the server's CPU time per request (from /proc, all threads,
# including the ingestion of the run's usage records, which may finish
# after wrk: a usage query before each reading waits for it), and the
# median of that CPU time divided by wrk's own per request with its ratio
# to the first: wrk does the same work for each request whatever serves it,
# so the quotient cancels the machine's drifting speed (on a 2-core VM the
# rounds of one configuration spread ±15 % in req/s, ±2 % in the quotient).
# That holds while wrk is saturated (32 connections: each of its wake-ups
# reads many answers); at 2 connections its CPU per request grows with the
# server's latency (7.8 to 21 µs here), so there the quotient understates
# a slower server's cost.
#   records     usage records on, default (process) durability; request log
#               lines off (HEARTH_LOG=warn), public function: like the reference
#   no-metering the same with --no-metering
#   strict      the same with --usage-durability strict
#   defaults    the server's defaults: records on, request log lines at the
#               default level (info), a bearer token on each request
#   lines       records on with request log lines at info, public (the
#               defaults' cost split: `records lines token defaults`)
#   token       records on, no request lines, a bearer token on each request
#   wasmtime    `wasmtime serve --max-instance-reuse-count 1000` on the same
#               component (when a wasmtime CLI is found: PATH, or
#               ~/.cache/hearth/tools/bin from
#               `cargo install wasmtime-cli --version 48.0.8 --root ~/.cache/hearth/tools`)
#   wasmtime-timeout  the same with a request timeout (`-W timeout=30s`), as
#               Hearth always has one: it compiles the same epoch checks
#               into the guest's code (Hearth's `epoch_interruption`), which
#               `wasmtime serve` leaves out when no timeout is asked for
# and, for a fresh instance per request (`scaling.reuse = false`):
#   fresh       records on, as `records`, every request on a new instance
#   fresh-plain the same without pre-initialisation (--no-pre-init)
#   fresh-decommit-64  the same, pooled slots decommitted in batches of 64
#               (--pool-decommit-batch 64) instead of one by one
#   wasmtime-fresh  `wasmtime serve --max-instance-reuse-count 1`
# (HEARTH_COMPARE="fresh fresh-plain wasmtime-fresh" compares those.)
# A configuration may name the Hearth binary it runs, to compare two builds
# side by side: HEARTH_COMPARE="records@/tmp/hearth-before records"; for
# `wasmtime`, the wasmtime CLI it runs (one built with
# `cargo install ... --profile fastest-runtime`, wasmtime's own LTO profile:
# HEARTH_COMPARE="defaults wasmtime wasmtime@$HOME/.cache/hearth/tools-lto/bin/wasmtime").
#   scripts/load-compare.sh [ROUNDS] [DURATION] [CONNECTIONS...]
# Knobs: HEARTH_BIN=PATH (else a release build), HEARTH_COMPARE="records
# no-metering ..." (the configurations, first is the base of the ratios).
# HEARTH_SERVER_CPUS and HEARTH_LOAD_CPUS (taskset CPU lists, e.g. 1 and 0,
# or 0-7 and 8-15) pin the server and wrk to CPUs of their own: on a
# machine with cores enough, the load generator then neither competes with
# the server nor moves its threads about (on 2 cores, the server gets one).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
rounds="${1:-5}" duration="${2:-8}"
shift $(($# > 2 ? 2 : $#))
conns=("$@")
[ ${#conns[@]} = 0 ] && conns=(32 2)
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
if [ -n "${HEARTH_BIN:-}" ]; then
  hearth="$(realpath "$HEARTH_BIN")"
else
  cargo build --release --locked -p hearth-server
  hearth="${CARGO_TARGET_DIR:-target}/release/hearth"
fi
(cd functions && env -u CARGO_TARGET_DIR cargo build -q --release --locked -p hello)
wasm="$PWD/functions/target/wasm32-wasip2/release/hello.wasm"
wasmtime="$(command -v wasmtime || true)"
[ -z "$wasmtime" ] && [ -x "$HOME/.cache/hearth/tools/bin/wasmtime" ] && wasmtime="$HOME/.cache/hearth/tools/bin/wasmtime"
read -r -a configs <<<"${HEARTH_COMPARE:-records no-metering strict defaults wasmtime}"
server_pin=() load_pin=()
[ -n "${HEARTH_SERVER_CPUS:-}" ] && server_pin=(taskset -c "$HEARTH_SERVER_CPUS")
[ -n "${HEARTH_LOAD_CPUS:-}" ] && load_pin=(taskset -c "$HEARTH_LOAD_CPUS")
if [ -z "$wasmtime" ]; then
  echo "== no wasmtime CLI: the reference is skipped" >&2
  configs=("${configs[@]/wasmtime*/}")
  read -r -a configs <<<"${configs[*]}"
fi
work="$(mktemp -d)"
port=18090
token="hth_compare_$$"
server=""
trap '[ -n "$server" ] && kill -TERM $server 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

start() { # config[@binary] -> sets server, url, auth
  local config="${1%%@*}" bin="$hearth" args=() log=warn public=true reuse=true
  [[ "$1" == *@* ]] && bin="${1#*@}"
  auth=()
  case "$config" in
    fresh) reuse=false ;;
    fresh-plain) reuse=false args=(--no-pre-init) ;;
    fresh-decommit-64) reuse=false args=(--pool-decommit-batch 64) ;;
    no-metering) args=(--no-metering) ;;
    strict) args=(--usage-durability strict) ;;
    defaults) log=info public=false auth=(-H "Authorization: Bearer $token") ;;
    lines) log=info ;;
    token) public=false auth=(-H "Authorization: Bearer $token") ;;
    wasmtime | wasmtime-fresh | wasmtime-timeout)
      local reuse_count=1000 limits=()
      [ "$config" = wasmtime-fresh ] && reuse_count=1
      [ "$config" = wasmtime-timeout ] && limits=(-W timeout=30s)
      local cli="$wasmtime"
      [[ "$1" == *@* ]] && cli="$bin"
      "${server_pin[@]}" "$cli" serve -O pooling-allocator -S cli "${limits[@]}" --addr "127.0.0.1:$port" \
        --max-instance-reuse-count "$reuse_count" "$wasm" >/dev/null 2>&1 &
      server=$!
      url="http://127.0.0.1:$port/load?x=1"
      for _ in $(seq 1 100); do curl -fsS "$url" >/dev/null 2>&1 && return; sleep 0.1; done
      echo "wasmtime serve did not start" >&2; exit 1 ;;
  esac
  rm -rf "$work/data" "$work/hello"
  mkdir -p "$work/hello"
  printf 'name = "hello"\ncomponent = "%s"\npublic = %s\n[scaling]\nreuse = %s\n' \
    "$wasm" "$public" "$reuse" >"$work/hello/hearth.toml"
  HEARTH_ADMIN_TOKEN="$token" HEARTH_LOG="$log" "${server_pin[@]}" "$bin" serve --listen "127.0.0.1:$port" \
    --data-dir "$work/data" "${args[@]}" >/dev/null 2>"$work/server.log" &
  server=$!
  wait_ready "http://127.0.0.1:$port"
  HEARTH_URL="http://127.0.0.1:$port" HEARTH_TOKEN="$token" "$bin" deploy "$work/hello" --no-build >/dev/null
  url="http://127.0.0.1:$port/fn/default/hello/load?x=1"
}

stop() {
  kill -TERM "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  server=""
}

# Records a run wrote and the server has not yet ingested are work that run
# made (ingestion runs when the CPU is idle): a query waits for all of them,
# so the CPU per request counts them.
drain() {
  case "${config%%@*}" in
    wasmtime* | no-metering) ;;
    *) curl -fsS -o /dev/null -H "Authorization: Bearer $token" "http://127.0.0.1:$port/v1/usage?limit=1" ;;
  esac
}

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$server/stat"; }

declare -A results cpu relative
TIMEFORMAT='%U %S'
for round in $(seq 1 "$rounds"); do
  n=${#configs[@]}
  for i in $(seq 0 $((n - 1))); do
    config="${configs[$(((i + round - 1) % n))]}"
    start "$config"
    for c in "${conns[@]}"; do
      "${load_pin[@]}" wrk -t2 -c"$c" -d1s "${auth[@]}" "$url" >/dev/null # warm up
      drain
      before="$(cpu_ticks)"
      { time "${load_pin[@]}" wrk -t2 -c"$c" -d"${duration}s" "${auth[@]}" "$url" >"$work/wrk.out"; } 2>"$work/wrk.time"
      out="$(cat "$work/wrk.out")"
      drain
      after="$(cpu_ticks)"
      rate="$(echo "$out" | awk '/Requests\/sec/ { print $2 }')"
      # The server's CPU time (all its threads) per request: steadier than
      # throughput on a machine whose speed drifts.
      per="$(echo "$out" | awk -v a="$before" -v b="$after" -v hz="$(getconf CLK_TCK)" \
        '/requests in/ { printf "%.1f", (b - a) * 1e6 / hz / $1 }')"
      client="$(echo "$out" | awk -v t="$(cat "$work/wrk.time")" \
        '/requests in/ { split(t, cpu, " "); printf "%.2f", (cpu[1] + cpu[2]) * 1e6 / $1 }')"
      rel="$(awk -v s="$per" -v c="$client" 'BEGIN { printf "%.3f", s / c }')"
      results["$config/$c"]="${results["$config/$c"]:-} $rate"
      cpu["$config/$c"]="${cpu["$config/$c"]:-} $per"
      relative["$config/$c"]="${relative["$config/$c"]:-} $rel"
      echo "round $round, $config, $c connections: $rate req/s, $per us CPU/request, wrk $client us, server/wrk $rel"
    done
    stop
  done
done

median() { tr ' ' '\n' | grep . | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# Round by round, each of the second list's values over the first's (the
# two ran minutes apart at most, in the same round): the median and the
# range of those, as "median [min-max]".
paired() {
  awk -v a="$1" -v b="$2" 'BEGIN {
    n = split(a, x, " "); split(b, y, " ")
    for (i = 1; i <= n; i++) {
      v = y[i] / x[i]
      for (j = i - 1; j >= 1 && r[j] > v; j--) r[j + 1] = r[j]
      r[j + 1] = v
    }
    m = (n % 2) ? r[(n + 1) / 2] : (r[n / 2] + r[n / 2 + 1]) / 2
    printf "%.3f [%.3f-%.3f]", m, r[1], r[n]
  }'
}
echo
echo "medians of $rounds rounds, ${duration}s each (ratios to ${configs[0]}: of the medians' req/s; of req/s round by"
echo "round, median [range]: the rounds' spread, which a difference must exceed to count on this machine;"
echo "and of its server/wrk over each one's):"
for c in "${conns[@]}"; do
  base="$(echo "${results["${configs[0]}/$c"]}" | median)"
  base_rel="$(echo "${relative["${configs[0]}/$c"]}" | median)"
  for config in "${configs[@]}"; do
    m="$(echo "${results["$config/$c"]}" | median)"
    u="$(echo "${cpu["$config/$c"]}" | median)"
    r="$(echo "${relative["$config/$c"]}" | median)"
    printf '  %-12s %3s conns  %9.0f req/s  %.3f  by round %s  %6.1f us CPU/request  server/wrk %.3f  %.3f\n' \
      "$config" "$c" "$m" "$(awk -v a="$base" -v b="$m" 'BEGIN { print b / a }')" \
      "$(paired "${results["${configs[0]}/$c"]}" "${results["$config/$c"]}")" "$u" "$r" \
      "$(awk -v a="$base_rel" -v b="$r" 'BEGIN { print a / b }')"
  done
done
