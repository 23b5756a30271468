#!/usr/bin/env bash
# Starts `hearth serve` on the embedded default (SQLite in ./.hearth), deploys
# the example functions with the CLI, prints how to call them, and keeps
# serving until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2

listen="${HEARTH_LISTEN:-127.0.0.1:8080}"
data_dir="${HEARTH_DATA_DIR:-./.hearth}"
echo "building hearth (release; the first build takes a few minutes)..." >&2
cargo build --release --locked -p hearth-server
hearth="${CARGO_TARGET_DIR:-target}/release/hearth"

# The demo keeps its admin token next to the data so reruns can deploy again.
# A real deployment sets HEARTH_ADMIN_TOKEN from a secret store instead.
mkdir -p "$data_dir"
token_file="$data_dir/demo-admin-token"
if [[ -z "${HEARTH_ADMIN_TOKEN:-}" ]]; then
  [[ -s "$token_file" ]] || (umask 077; echo "hth_demo_$(head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')" >"$token_file")
  HEARTH_ADMIN_TOKEN="$(cat "$token_file")"
fi
export HEARTH_ADMIN_TOKEN HEARTH_TOKEN="$HEARTH_ADMIN_TOKEN" HEARTH_URL="http://$listen"

"$hearth" serve --listen "$listen" --data-dir "$data_dir" &
server=$!
stop() { kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; }
trap 'stop; exit 0' INT TERM
trap stop EXIT
for _ in $(seq 1 100); do
  curl -fsS "$HEARTH_URL/readyz" >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { echo "hearth serve exited" >&2; exit 1; }
  sleep 0.1
done

for fn in hello echo; do
  env -u CARGO_TARGET_DIR "$hearth" deploy "functions/$fn"
done
# classify's MLP is generated from fixed seeds; ocr's model comes from PyPI.
cargo run -q --release --locked -p hearth-fixtures --bin gen-models >/dev/null
cargo run -q --release --locked -p hearth-fixtures --bin render-line -- 'HEARTH 2026' "$data_dir/line.png"
env -u CARGO_TARGET_DIR "$hearth" deploy functions/classify
if ./scripts/fetch-ocr-model.sh >/dev/null; then
  env -u CARGO_TARGET_DIR "$hearth" deploy functions/ocr
else
  echo "(ocr not deployed: fetching its model from PyPI failed)" >&2
fi
if HEARTH_CARGO_PROFILE=release ./scripts/fetch-embed-model.sh >/dev/null; then
  env -u CARGO_TARGET_DIR "$hearth" deploy functions/embed
else
  echo "(embed not deployed: fetching its model from PyPI failed)" >&2
fi

cat <<EOT

Hearth is serving on $HEARTH_URL with the examples deployed.
  export HEARTH_URL=$HEARTH_URL HEARTH_TOKEN=$HEARTH_TOKEN
  $hearth invoke hello
  $hearth invoke echo --data 'hi' --path '/any/path?x=1'
  python3 -c 'import json; print(json.dumps({"input": [0.5] * 784}))' | $hearth invoke classify --data @-
  $hearth invoke ocr --data @$data_dir/line.png    # a rendered 'HEARTH 2026'
  $hearth invoke embed --data '{"texts": ["hello, world!", "a second sentence"]}'
  curl -H "Authorization: Bearer \$HEARTH_TOKEN" $HEARTH_URL/v2/models/embed.minilm   # Open Inference Protocol
  $hearth status
  curl -H "Authorization: Bearer \$HEARTH_TOKEN" -d hi $HEARTH_URL/fn/default/echo/some/path
  $hearth functions list
Press Ctrl-C to stop.
EOT
wait $server
