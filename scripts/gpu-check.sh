#!/usr/bin/env bash
# GPU check: the model conformance cases on CUDA against the CPU (stated
# tolerances), and the batching throughput on the GPU, from prebuilt
# binaries: the GPU machine needs the NVIDIA driver, the CUDA headers and the
# cuBLAS/cuDNN/NVRTC/cudart libraries (e.g. PyTorch's nvidia-* wheels), but no
# Rust toolchain and no network.
#
#   scripts/gpu-check.sh pack   # on a development machine: build stripped
#                               # release binaries with the `cuda` feature
#                               # into dist/gpu-check/ (gitignored), with the
#                               # OCR model
#   scripts/gpu-check.sh run    # on the GPU machine, from the repository
#                               # root: finds CUDA_HOME and the libraries,
#                               # runs the check (< 8 minutes on one H200)
set -euo pipefail
cd "$(dirname "$0")/.."
dist=dist/gpu-check

pack() {
  cache="$(./scripts/fetch-ocr-model.sh)"
  cargo build --release --locked -p hearth-conformance --features cuda
  mkdir -p "$dist"
  cp "${CARGO_TARGET_DIR:-target}/release/hearth-conformance" "$dist/"
  strip "$dist/hearth-conformance"
  cp "$cache/ch_PP-OCRv4_rec_infer.onnx" "$dist/"
  ls -la "$dist"
}

run() {
  [[ -x "$dist/hearth-conformance" ]] || { echo "no $dist/hearth-conformance: run '$0 pack' first" >&2; exit 1; }
  # CUDA headers: tract-cuda compiles its kernels with NVRTC at run time.
  if [[ -z "${CUDA_HOME:-}" ]]; then
    for candidate in /usr/local/cuda /usr/local/cuda-* /opt/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")")"; do
      [[ -f "$candidate/include/cuda.h" ]] && { export CUDA_HOME="$candidate"; break; }
    done
  fi
  echo "CUDA_HOME=${CUDA_HOME:-unset}"
  # Libraries: the system's CUDA, then any nvidia-* Python wheels.
  libs=()
  [[ -n "${CUDA_HOME:-}" ]] && libs+=("$CUDA_HOME/lib64" "$CUDA_HOME/lib")
  while IFS= read -r dir; do libs+=("$dir"); done < <(
    python3 - 2>/dev/null <<'PY' || true
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for root in roots:
    for lib in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib"))):
        print(lib)
PY
  )
  LD_LIBRARY_PATH="$(IFS=:; echo "${libs[*]:-}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LD_LIBRARY_PATH
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(nvidia-smi not found)"
  export HEARTH_LOG="${HEARTH_LOG:-info}" RUST_LOG="${RUST_LOG:-tract_cuda=info}"
  out="$(mktemp)"
  status=0
  timeout 480 "$dist/hearth-conformance" --bench "$dist/ch_PP-OCRv4_rec_infer.onnx" | tee "$out" || status=$?
  # A GPU check that ran on the CPU alone proves nothing about the GPU.
  if ! grep -q '| cuda:' "$out"; then
    echo "no case ran on a CUDA device: see the log above for why the GPU was not used" >&2
    status=1
  fi
  rm -f "$out"
  exit "$status"
}

case "${1:-}" in
  pack) pack ;;
  run) run ;;
  *) echo "usage: $0 pack|run" >&2; exit 2 ;;
esac
