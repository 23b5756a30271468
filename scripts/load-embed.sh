#!/usr/bin/env bash
# Batching on a real model: `embed` (all-MiniLM-L6-v2) end to end on a
# release `hearth serve`, batching on (the manifest's max_batch 32, no
# waiting while a lane is free) against off (--batch-max-rows 1), side by
# side in one run
# (ROUNDS alternating rounds each way), beside the model-alone ceiling
# measured with the same thread settings (model-ceiling).
#   scripts/load-embed.sh [DURATION=10] [CONNECTIONS=32] [WORDS=8] [ROUNDS=2]
# WORDS per text sets the padded length: 8 words ≈ 12 tokens → bucket 16;
# 20 → 32; 45 → 64. Each request embeds one text (texts vary, lengths not).
# Prints req/s, p50/p99 latency and the mean batch (rows per model run,
# from the Triton counters) for each round, and the gain on ÷ off.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
duration="${1:-10}"
connections="${2:-32}"
words="${3:-8}"
rounds="${4:-2}"
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }

cargo build --release --locked -q -p hearth-server -p hearth-conformance
./scripts/fetch-embed-model.sh >/dev/null
(cd functions && env -u CARGO_TARGET_DIR cargo build --release --locked -q -p embed)
target="${CARGO_TARGET_DIR:-target}/release"
hearth="$target/hearth"
model="functions/embed/models/all-MiniLM-L6-v2.onnx"
work="$(mktemp -d)"
server=""
trap '[[ -n $server ]] && kill -TERM $server 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

bucket=$(python3 -c "
w=$words+4
print(next(b for b in (16,32,64,128,256) if b >= w*1.3))")
echo "== the model alone ($model), rows of length $bucket"
"$target/model-ceiling" "$model" 32 "$bucket" 5 | tee "$work/ceiling.md"
ceiling=$(grep -E "^\| $bucket " "$work/ceiling.md" | awk -F'|' '{gsub(/[ x]/, "", $5); print $5}')

# 64 different texts of the same word count, one per request, in turn.
python3 - "$words" "$work/bodies.lua" <<'PY'
import json, random, sys
words, out = int(sys.argv[1]), sys.argv[2]
vocab = ("model serve batch token vector search query index answer device cache "
         "cold start scale request tenant record billing quick brown fox jumps over lazy dog "
         "river mountain city night music paper garden window coffee market").split()
rng = random.Random(20261201)
bodies = [json.dumps({"texts": [" ".join(rng.choice(vocab) for _ in range(words))]}) for _ in range(64)]
with open(out, "w") as f:
    f.write("bodies = {" + ",".join("[==[" + b + "]==]" for b in bodies) + "}\n")
PY
cat >"$work/post.lua" <<EOT
dofile("$work/bodies.lua")
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", nil, {["content-type"] = "application/json"}, bodies[(n % #bodies) + 1])
end
EOT

export HEARTH_ADMIN_TOKEN="hth_load_$$" HEARTH_TOKEN="hth_load_$$"
port=18082
declare -A rates
for round in $(seq 1 "$rounds"); do
  for mode in off on; do
    flags=()
    [[ $mode == off ]] && flags=(--batch-max-rows 1)
    rm -rf "$work/data"
    serve_on "$port" "$work/data" "${flags[@]}"
    "$hearth" deploy functions/embed --no-build >/dev/null
    # Warm: the model loaded, the instances started.
    wrk -t2 -c"$connections" -d2s -s "$work/post.lua" "$HEARTH_URL/fn/default/embed/" >/dev/null
    before=$(curl -fsS -H "Authorization: Bearer $HEARTH_TOKEN" "$HEARTH_URL/metrics")
    out=$(wrk -t2 -c"$connections" -d"${duration}s" --latency -s "$work/post.lua" "$HEARTH_URL/fn/default/embed/")
    after=$(curl -fsS -H "Authorization: Bearer $HEARTH_TOKEN" "$HEARTH_URL/metrics")
    count() { grep -E "^$1\{model=\"embed.minilm\"" <<<"$2" | awk '{print $2}'; }
    rows=$(( $(count nv_inference_count "$after") - $(count nv_inference_count "$before") ))
    runs=$(( $(count nv_inference_exec_count "$after") - $(count nv_inference_exec_count "$before") ))
    rate=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    errors=$(grep -E "Non-2xx|Socket errors" <<<"$out" || true)
    mean=$(awk -v r="$rows" -v n="$runs" 'BEGIN {printf "%.1f", (n > 0 ? r / n : 0)}')
    printf "round %s batching %-3s  %8s req/s  p50 %8s  p99 %8s  mean batch %s %s\n" "$round" "$mode" "$rate" "$p50" "$p99" "$mean" "$errors"
    rates[$mode]="${rates[$mode]:-} $rate"
    stop_server
  done
done
python3 - "$ceiling" "${rates[off]}" "${rates[on]}" <<'PY'
import statistics, sys
ceiling = float(sys.argv[1])
off = [float(x) for x in sys.argv[2].split()]
on = [float(x) for x in sys.argv[3].split()]
gain = statistics.median(on) / statistics.median(off)
print(f"end-to-end gain (median on / median off): {gain:.2f}x; model-alone ceiling {ceiling:.2f}x; "
      f"gain / ceiling = {gain / ceiling:.2f} (target >= 0.8)")
PY
