#!/usr/bin/env bash
# Run the GPU tests and the GPU benchmarks in one go on a machine with a CUDA device.
#
#   bash benchmarks/gpu_check.sh [OUTPUT_FOLDER]
#
# Writes each benchmark's Markdown to OUTPUT_FOLDER (default: gpu-results) and stops
# at the first failure. Uses the python on PATH unless PYTHON is set.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python}"
output="${1:-gpu-results}"
mkdir -p "$output"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

if ! "$python" -c 'import torch' 2>/dev/null; then
    echo "gpu_check: $python cannot import torch; set PYTHON to the interpreter that has the project installed" >&2
    exit 1
fi
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device is visible to torch; run this on a machine with a GPU" >&2
    exit 1
fi
"$python" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'

echo "== GPU tests"
(cd "$root" && "$python" -m pytest tests/test_gpu.py -q -rs -p no:cacheprovider)

echo "== SVD on CPU against CUDA"
"$python" "$here/factorize_device.py" | tee "$output/factorize_device.md"

echo "== per-layer timing on CUDA (both depthwise forms)"
"$python" "$here/layer_speed.py" --device cuda --min-run-time 0.5 | tee "$output/layer_speed_cuda.md"

echo "== resnet50 latency on CUDA"
"$python" "$here/model_latency.py" --device cuda --min-run-time 1 | tee "$output/model_latency_cuda.md"

echo "gpu_check: done; results in $output"
