#!/usr/bin/env bash
# Resident memory of one release `hearth serve` with N functions that all name
# the same model (PaddleOCR's recognition model, 10.9 MB). A deploy loads its
# models (that is the deploy-time check), so RSS after deploying 1 function
# vs N functions compares one loaded model with N functions sharing it: the
# difference should be far less than the model's size. Calls come after,
# separately: resident memory also grows with calls, whichever function is
# called (instance slots and allocator caches keeping pages).
#
#   scripts/bench-memory.sh [N=20]
#
# Needs the OCR model (scripts/fetch-ocr-model.sh). Prints VmRSS at each step.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-20}"
cache="$(./scripts/fetch-ocr-model.sh)"
cargo build --release --locked -q -p hearth-server
(cd functions && cargo build --release --locked -q -p ocr)
hearth="${CARGO_TARGET_DIR:-target}/release/hearth"
wasm="$PWD/functions/target/wasm32-wasip2/release/ocr.wasm"

work="$(mktemp -d)"
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
export HEARTH_ADMIN_TOKEN="hth_bench-memory" HEARTH_TOKEN="hth_bench-memory"
"$hearth" serve --listen 127.0.0.1:0 --data-dir "$work/data" >"$work/out" 2>"$work/log" &
server=$!
for _ in $(seq 1 200); do grep -q 'listening on' "$work/out" 2>/dev/null && break; sleep 0.05; done
export HEARTH_URL="$(sed -n 's/^hearth listening on //p' "$work/out")"
# A 200x48 white PNG with a black bar: enough to run the model.
python3 - "$work/line.png" <<'PY'
import struct, sys, zlib
w, h = 200, 48
rows = b"".join(b"\0" + bytes(0 if 10 < y < 38 and 20 < x < 180 else 255 for x in range(w) for _ in range(3)) for y in range(h))
chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
open(sys.argv[1], "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
PY
rss() { awk '/VmRSS/ {print $2}' "/proc/$server/status"; }

call() { "$hearth" invoke "fn-$1" --data "@$work/line.png" >/dev/null; }

deploy() {
  local name="fn-$1" dir="$work/fn-$1"
  mkdir -p "$dir"
  cat >"$dir/hearth.toml" <<EOT
name = "$name"
component = "$wasm"
[[models]]
name = "ppocr-rec"
path = "$cache/ch_PP-OCRv4_rec_infer.onnx"
[[files]]
source = "$cache/ppocr_keys.txt"
target = "/ppocr_keys.txt"
[limits]
memory_mb = 256
EOT
  "$hearth" deploy --no-build "$dir" >/dev/null
}

echo "RSS after start:                        $(rss) KiB"
deploy 1
one=$(rss)
echo "RSS with 1 function deployed:            $one KiB"
for i in $(seq 2 "$n"); do deploy "$i"; done
many=$(rss)
echo "RSS with $n functions deployed:           $many KiB"
model_kib=$(( $(stat -c %s "$cache/ch_PP-OCRv4_rec_infer.onnx") / 1024 ))
echo "difference:                              $(( many - one )) KiB (model file: $model_kib KiB)"
call 1
echo "RSS after 1 call:                        $(rss) KiB"
for i in $(seq 1 "$n"); do call "$i"; done
echo "RSS after 1 more call to each function:  $(rss) KiB (grows with calls, whichever function is called)"
"$hearth" status | sed -n '/warm models/,/functions/p'
