#!/usr/bin/env bash
# The prepared GPU check, for a bare lent machine: offline, no pip. The source tree goes on
# PYTHONPATH and torch is whatever the machine has. Finishes within 8 minutes on one
# H100/H200: every step has its own time limit and writes its results as it goes, so a step
# cut short keeps what it measured. Results go to $OUT (default ./gpu-results).
#
#   bash benchmarks/gpu.sh                       # on the GPU machine
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh    # dry run of the same script on a CPU (CI)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
QUICK_FLAG=""
if [ -n "${QUICK:-}" ]; then QUICK_FLAG="--quick"; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

# 1. What machine this is; without CUDA, say so and stop (unless this is the CPU dry run).
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} | tee "$OUT/machine.txt"
if [ "$DEVICE" = "cuda" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu.sh: this python's torch has no usable CUDA; nothing to check (DEVICE=cpu QUICK=1 for a dry run)" | tee -a "$OUT/machine.txt"
  exit 2
fi
status=0

# 2. Correctness on the device: every schedule x remat x fp32/bf16 against the plain model,
#    pipe.step and pipe(x).backward(); DistributedPipe on NCCL with 2+ GPUs (~1-2 minutes).
timeout 240 "$PY" benchmarks/gpu_check.py --device "$DEVICE" $QUICK_FLAG \
  --json "$OUT/gpu_check.json" 2>"$OUT/gpu_check.err" | tee "$OUT/gpu_check.md"
rc=${PIPESTATUS[0]}; echo "gpu_check exit status: $rc" | tee -a "$OUT/gpu_check.md"; [ "$rc" = 0 ] || status=1

# 3. The tests marked "device", on this device.
GPIPE_TEST_DEVICE="$DEVICE" timeout 90 "$PY" -m pytest -q -p no:cacheprovider -m device tests 2>&1 \
  | tail -5 | tee "$OUT/tests.txt"
rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || status=1

# 4. Pipe overhead vs the plain model (bf16) and peak memory by remat mode (~2-3 minutes).
timeout 200 "$PY" benchmarks/gpu_bench.py --device "$DEVICE" $QUICK_FLAG \
  --json "$OUT/gpu_bench.json" 2>"$OUT/gpu_bench.err" | tee "$OUT/gpu_bench.md"
rc=${PIPESTATUS[0]}; echo "gpu_bench exit status: $rc" | tee -a "$OUT/gpu_bench.md"; [ "$rc" = 0 ] || status=1

ls -l "$OUT"
exit $status
