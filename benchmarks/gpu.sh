#!/usr/bin/env bash
# The prepared GPU check (about 3-6 minutes on one H100/H200): run from the repository root on
# a machine whose python has a CUDA build of torch. Results go to $OUT (default ./gpu-results).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
"$PY" -c "import gpipe" 2>/dev/null || "$PY" -m pip install -q -e . --no-deps
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
# Pipe overhead vs the plain model (bf16) and peak memory by remat mode on one GPU.
timeout 420 "$PY" benchmarks/gpu_bench.py --json "$OUT/gpu_bench.json" | tee "$OUT/gpu_bench.md"
# The CPU suite's gradient matrix is device-independent; one quick sanity run of the tests
# that touch devices:
timeout 120 "$PY" -m pytest -q tests/test_pipe.py -k "float32 or no_grad" | tail -3 | tee "$OUT/tests.txt"
