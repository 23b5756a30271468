#!/usr/bin/env bash
# Cluster figures on this machine, with a release `hearth`, a throwaway
# PostgreSQL and moto's S3 server on loopback:
#   - first request on a node whose caches are empty (component fetched from
#     the bucket and compiled there);
#   - time for a redeploy through node A to take effect on node B;
#   - warm `hello` req/s on a node with the PostgreSQL store against one with
#     the embedded SQLite store, alternating rounds (wrk, 32 connections);
#   - the usage shipping lag on the PostgreSQL node meanwhile (the oldest
#     record not yet in the ledger, sampled from /metrics every 200 ms), and
#     how long its backlog takes to drain once the load stops.
#   scripts/cluster-bench.sh [ROUNDS] [SECONDS]
# Knobs: HEARTH_BIN=PATH (else a release build).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
rounds="${1:-3}" duration="${2:-5}"
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
if [ -n "${HEARTH_BIN:-}" ]; then
  hearth="$(realpath "$HEARTH_BIN")"
else
  cargo build --release --locked -p hearth-server
  hearth="$(realpath "${CARGO_TARGET_DIR:-target}/release/hearth")"
fi
(cd functions && env -u CARGO_TARGET_DIR cargo build -q --release --locked -p hello -p echo)
guests="$PWD/functions/target/wasm32-wasip2/release"
pgbin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
work="$(mktemp -d)"
chmod 755 "$work"
as_pg=(); [ "$(id -u)" = 0 ] && as_pg=(runuser -u postgres --)
pids=()
cleanup() {
  # Nodes start inside $(...) (a subshell): their pids are in a file.
  [ -f "$work/node-pids" ] && mapfile -t -O "${#pids[@]}" pids <"$work/node-pids"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  # Not this shell's children (see above): `wait` cannot wait for them.
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
  "${as_pg[@]}" "$pgbin/pg_ctl" -D "$work/pg/data" -m immediate stop >/dev/null 2>&1 || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now_ms() { date +%s%3N; }

mkdir -p "$work/pg"
[ "$(id -u)" = 0 ] && chown postgres "$work/pg"
pgport="$(free_port)"
"${as_pg[@]}" "$pgbin/initdb" -D "$work/pg/data" -A trust -U hearth --no-sync >/dev/null
"${as_pg[@]}" "$pgbin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w \
  -o "-p $pgport -k $work/pg -c listen_addresses=127.0.0.1" start >/dev/null
"$pgbin/createdb" -h 127.0.0.1 -p "$pgport" -U hearth hearth
store_url="postgres://hearth@127.0.0.1:$pgport/hearth"
s3port="$(free_port)"
python3 -m moto.server -H 127.0.0.1 -p "$s3port" >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -fsS -X PUT "http://127.0.0.1:$s3port/hearth" >/dev/null 2>&1 && break; sleep 0.1; done
export AWS_ENDPOINT_URL="http://127.0.0.1:$s3port" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
  AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench
token=hth_cluster_bench

node() { # name, extra args... -> prints the URL
  local name="$1"; shift
  local port; port="$(free_port)"
  HEARTH_ADMIN_TOKEN="$token" HEARTH_LOG=warn "$hearth" serve --listen "127.0.0.1:$port" \
    --data-dir "$work/$name" "$@" >/dev/null 2>"$work/$name.log" &
  echo $! >>"$work/node-pids"
  wait_ready "http://127.0.0.1:$port"
  echo "http://127.0.0.1:$port"
}
metric() { # url, metric name prefix -> its value
  curl -fsS -H "authorization: Bearer $token" "$1/metrics" | awk -v m="$2" 'index($1, m) == 1 { print $2; exit }'
}
deploy() { # url, name, component
  mkdir -p "$work/p/$2"
  printf 'name = "%s"\ncomponent = "%s"\npublic = true\n' "$2" "$3" >"$work/p/$2/hearth.toml"
  HEARTH_URL="$1" HEARTH_TOKEN="$token" "$hearth" deploy "$work/p/$2" --no-build >/dev/null
}

cluster=(--store-url "$store_url" --blob-url s3://hearth/blobs)
a="$(node a "${cluster[@]}")"
b="$(node b "${cluster[@]}")"
deploy "$a" greet "$guests/hello.wasm"
start="$(now_ms)"
curl -fsS "$b/fn/default/greet/" >/dev/null
echo "first request on an empty node (fetch + compile): $(($(now_ms) - start)) ms"
curl -fsS "$b/fn/default/greet/" >/dev/null
start="$(now_ms)"
curl -fsS "$b/fn/default/greet/" >/dev/null
echo "a warm request on that node: $(($(now_ms) - start)) ms (curl, for scale)"

# Alternates hello and echo; B has the new version once its answer is (or
# stops being) hello's.
hello_says="$(curl -fsS "$b/fn/default/greet/")"
for i in 1 2 3 4; do
  if [ $((i % 2)) = 1 ]; then
    deploy "$a" greet "$guests/echo.wasm"
    start="$(now_ms)"
    until [ "$(curl -fsS "$b/fn/default/greet/")" != "$hello_says" ]; do :; done
  else
    deploy "$a" greet "$guests/hello.wasm"
    start="$(now_ms)"
    until [ "$(curl -fsS "$b/fn/default/greet/")" = "$hello_says" ]; do :; done
  fi
  echo "redeploy through A in effect on B $(($(now_ms) - start)) ms after the deploy returned"
done

c="$(node c "${cluster[@]}")"
s="$(node s)"
deploy "$c" hello "$guests/hello.wasm"
deploy "$s" hello "$guests/hello.wasm"
declare -A rates
for round in $(seq 1 "$rounds"); do
  for config in postgres sqlite; do
    url="$c"; [ "$config" = sqlite ] && url="$s"
    wrk -t2 -c32 -d1s "$url/fn/default/hello/" >/dev/null
    if [ "$config" = postgres ]; then
      (while :; do metric "$url" hearth_usage_shipping_lag; sleep 0.2; done >"$work/lag") &
      sampler=$!
    fi
    rate="$(wrk -t2 -c32 -d"${duration}s" "$url/fn/default/hello/" | awk '/Requests\/sec/ { print $2 }')"
    rates[$config]="${rates[$config]:-} $rate"
    echo "round $round, $config store: $rate req/s"
    if [ "$config" = postgres ]; then
      kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
      start="$(now_ms)"
      until [ "$(metric "$url" hearth_usage_unshipped)" = 0 ]; do sleep 0.05; done
      echo "  shipping lag under load: max $(sort -g "$work/lag" | tail -1) s, median $(sort -g "$work/lag" | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }') s; backlog drained $(($(now_ms) - start)) ms after the load stopped"
    fi
  done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
pg="$(echo "${rates[postgres]}" | median)" lite="$(echo "${rates[sqlite]}" | median)"
echo "warm hello, medians of $rounds rounds: postgres store $pg req/s, sqlite store $lite req/s, ratio $(awk -v a="$pg" -v b="$lite" 'BEGIN { printf "%.3f", a / b }')"
