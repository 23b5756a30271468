#!/usr/bin/env bash
# Resident memory of one release `hearth serve` holding N deployed functions
# that have all scaled to zero: what a node pays per idle function (its
# parked component, routes, pool and metric series), and so how many such
# functions fit in a GiB.
#
# The functions are N distinct components: `hello` with a custom section
# naming its index appended (same code, different digest), so each has its
# own compiled artifact and parked component, as distinct functions do.
# Each is called once (so it went through a whole load, instance and scale
# to zero) before the last figure.
#
#   scripts/bench-idle-memory.sh [N=1000]
#
# Prints VmRSS (and its anonymous and file-backed parts) at each step.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-1000}"
cargo build --release --locked -q -p hearth-server
(cd functions && env -u CARGO_TARGET_DIR cargo build -q --release --locked -p hello)
hearth="${CARGO_TARGET_DIR:-target}/release/hearth"
wasm="$PWD/functions/target/wasm32-wasip2/release/hello.wasm"

work="$(mktemp -d)"
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
export HEARTH_ADMIN_TOKEN="hth_bench-idle-memory" HEARTH_TOKEN="hth_bench-idle-memory"
HEARTH_LOG=warn "$hearth" serve --listen 127.0.0.1:0 --data-dir "$work/data" \
  --function-idle-timeout-s 0 --reap-interval-ms 100 >"$work/out" 2>"$work/log" &
server=$!
for _ in $(seq 1 200); do grep -q 'listening on' "$work/out" 2>/dev/null && break; sleep 0.05; done
export HEARTH_URL="$(sed -n 's/^hearth listening on //p' "$work/out")"

rss() {
  awk '/^(VmRSS|RssAnon|RssFile):/ { v[$1] = $2 } END {
    printf "%d KiB (anonymous %d, file-backed %d)", v["VmRSS:"], v["RssAnon:"], v["RssFile:"] }' "/proc/$server/status"
}
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$server/status"; }

# N projects, each with its own copy of hello carrying its index.
python3 - "$wasm" "$work" "$n" <<'PY'
import os, sys
wasm, work, n = open(sys.argv[1], "rb").read(), sys.argv[2], int(sys.argv[3])
def leb(v):
    out = bytearray()
    while True:
        byte, v = v & 0x7F, v >> 7
        out.append(byte | (0x80 if v else 0))
        if not v:
            return bytes(out)
for i in range(n):
    name = b"hearth-bench-index"
    body = leb(len(name)) + name + str(i).encode()
    d = os.path.join(work, f"fn-{i}")
    os.makedirs(d)
    open(os.path.join(d, "hello.wasm"), "wb").write(wasm + b"\0" + leb(len(body)) + body)
    open(os.path.join(d, "hearth.toml"), "w").write(
        f'name = "fn-{i}"\ncomponent = "hello.wasm"\npublic = true\n[scaling]\nidle_timeout_s = 0\n')
PY

start_kib=$(rss_kib)
echo "RSS after start:                              $(rss)"
started=$(date +%s)
seq 0 $((n - 1)) | xargs -P 2 -I{} "$hearth" deploy --no-build "$work/fn-{}" >/dev/null
echo "RSS with $n functions deployed (never called): $(rss)   [deploys took $(( $(date +%s) - started )) s]"
seq 0 $((n - 1)) | xargs -P 2 -I{} curl -fsS -o /dev/null "$HEARTH_URL/fn/default/fn-{}/"
echo "RSS right after one call to each:             $(rss)"
# Until every function has scaled to zero: no instance, code unloaded.
for _ in $(seq 1 600); do
  curl -fsS -H "Authorization: Bearer $HEARTH_TOKEN" "$HEARTH_URL/v1/status" >"$work/status.json"
  python3 - "$work/status.json" <<'PY' && break
import json, sys
fns = json.load(open(sys.argv[1]))["functions"]
sys.exit(0 if all(not f["instances"]["loaded"] and f["instances"]["idle"] == 0 for f in fns) else 1)
PY
  sleep 0.2
done
idle_kib=$(rss_kib)
echo "RSS with all $n scaled to zero:               $(rss)"
per=$(( (idle_kib - start_kib) / n ))
echo "per function scaled to zero: $per KiB  =>  about $(( 1024 * 1024 / (per > 0 ? per : 1) )) functions per GiB"
