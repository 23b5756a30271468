#!/usr/bin/env bash
# Fetches the PaddleOCR recognition model that the PyPI package
# rapidocr-onnxruntime ships, into a cache outside git:
#   $HEARTH_MODEL_CACHE (default ~/.cache/hearth/models)/
#     ch_PP-OCRv4_rec_infer.onnx   the model
#     ppocr_keys.txt               its character list (the model's `character`
#                                  metadata, one entry per line)
# and links functions/ocr/models to it. Only the package registry is
# contacted; a second run finds everything cached and does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

version="1.4.4"
cache="${HEARTH_MODEL_CACHE:-$HOME/.cache/hearth/models}"
model="$cache/ch_PP-OCRv4_rec_infer.onnx"
keys="$cache/ppocr_keys.txt"
mkdir -p "$cache/wheels"

if [[ ! -s "$model" || ! -s "$keys" ]]; then
  wheel="$cache/wheels/rapidocr_onnxruntime-$version-py3-none-any.whl"
  if [[ ! -s "$wheel" ]]; then
    echo "downloading rapidocr-onnxruntime $version from PyPI..." >&2
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
      "rapidocr-onnxruntime==$version" -d "$cache/wheels"
  fi
  python3 - "$wheel" "$model" "$keys" <<'PY'
import sys, zipfile

wheel, model_out, keys_out = sys.argv[1:]
data = zipfile.ZipFile(wheel).read("rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx")

def varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]; i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i

def fields(buf):
    """(field number, wire type, value) of each top-level protobuf field."""
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value

# ModelProto.metadata_props = 14: StringStringEntryProto {key = 1, value = 2}.
character = None
for number, wire, value in fields(data):
    if number == 14 and wire == 2:
        entry = {n: v for n, _, v in fields(value)}
        if entry.get(1) == b"character":
            character = entry[2].decode("utf-8")
if character is None:
    sys.exit("the model has no `character` metadata")
with open(model_out + ".part", "wb") as f:
    f.write(data)
with open(keys_out, "w", encoding="utf-8") as f:
    f.write("\n".join(character.splitlines()) + "\n")
import os
os.replace(model_out + ".part", model_out)
print(f"{model_out}: {len(data)} bytes; {len(character.splitlines())} characters", file=sys.stderr)
PY
fi

mkdir -p functions/ocr
ln -sfn "$cache" functions/ocr/models
echo "$cache"
