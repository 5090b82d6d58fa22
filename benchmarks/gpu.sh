#!/usr/bin/env bash
# The prepared GPU check, for a bare lent machine: offline, no pip, the machine's own python3
# and torch, the source tree on PYTHONPATH (gpipe's core needs only torch). Finishes within 6
# minutes on one H100/H200: every step has its own time limit (they add up to 340 s) and
# writes its results as it goes, so a step cut short keeps what it measured. Results, as
# markdown tables, go to the folder given as the argument, else $OUT, else ./gpu-results.
#
#   bash benchmarks/gpu.sh [DIR]           # on the GPU machine
#   GPU_DRY=1 bash benchmarks/gpu.sh [DIR] # the same steps on the CPU, quickly (CI: make gpu-dry)
#   bash benchmarks/gpu.sh --dry [DIR]     # the same
set -uo pipefail
cd "$(dirname "$0")/.."
DRY="${GPU_DRY:-}"
if [ "${1:-}" = "--dry" ]; then DRY=1; shift; fi
OUT="${1:-${OUT:-gpu-results}}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ -n "$DRY" ]; then DEVICE=cpu; QUICK=1; fi
DEVICE="${DEVICE:-cuda}"
QUICK_FLAG=""
if [ -n "${QUICK:-}" ]; then QUICK_FLAG="--quick"; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
STEPS_DEVICE="$DEVICE"
if [ "$DEVICE" = "cuda" ]; then STEPS_DEVICE="cuda:0"; fi
status=0

# 1. What machine this is; without CUDA, say so and stop (unless this is the CPU dry run).
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} | tee "$OUT/machine.txt"
if [ "$DEVICE" = "cuda" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu.sh: this python's torch has no usable CUDA; nothing to check (GPU_DRY=1 for a dry run)" | tee -a "$OUT/machine.txt"
  exit 2
fi
rm -f "$OUT/gpu_steps.md"

# 2. Training: every schedule 3 steps with SGD against the plain model, host<->device pipes
#    both ways, DistributedPipe with 2 gloo ranks on the one device (~1 minute).
timeout 90 "$PY" benchmarks/gpu_steps.py --device "$STEPS_DEVICE" $QUICK_FLAG --out "$OUT" \
  2>"$OUT/gpu_steps.err"
rc=$?; echo "gpu_steps exit status: $rc" | tee -a "$OUT/gpu_steps.md"; [ "$rc" = 0 ] || status=1

# 3. A few cases under CUDA's stream sanitizer (a kernel reading memory another stream may
#    still write is an error): copies between the host and the device, and two schedules.
if [ "$DEVICE" = "cuda" ]; then
  TORCH_CUDA_SANITIZER=1 timeout 50 "$PY" benchmarks/gpu_steps.py --device "$STEPS_DEVICE" \
    --sections schedules,host --schedules 1f1b,zb-h1 --steps 2 --title "sanitizer" \
    --out "$OUT" 2>"$OUT/sanitizer.err"
  rc=$?; echo "sanitizer exit status: $rc" | tee -a "$OUT/gpu_steps.md"; [ "$rc" = 0 ] || status=1
else
  echo "sanitizer: skipped (CUDA only)" | tee -a "$OUT/gpu_steps.md"
fi

# 4. One step's gradients: every schedule x remat x fp32/bf16 against the plain model,
#    pipe.step and pipe(x).backward(), long kernels, the user-path cases.
timeout 110 "$PY" benchmarks/gpu_check.py --device "$DEVICE" $QUICK_FLAG \
  --json "$OUT/gpu_check.json" 2>"$OUT/gpu_check.err" | tee "$OUT/gpu_check.md"
rc=${PIPESTATUS[0]}; echo "gpu_check exit status: $rc" | tee -a "$OUT/gpu_check.md"; [ "$rc" = 0 ] || status=1

# 5. The tests marked "device", on this device: only the files that have them are collected,
#    so a test module that needs another torch cannot abort the run.
mapfile -t FILES < <(grep -l "mark.device" tests/test_*.py)
GPIPE_TEST_DEVICE="$DEVICE" timeout 50 "$PY" -m pytest -q -p no:cacheprovider -m device \
  --continue-on-collection-errors "${FILES[@]}" 2>&1 | tail -5 | tee "$OUT/tests.txt"
rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || status=1

# 6. Pipe overhead vs the plain model (bf16) and peak memory by remat mode (not on a dry run:
#    CPU figures say nothing about a GPU).
if [ -z "$DRY" ]; then
  timeout 40 "$PY" benchmarks/gpu_bench.py --device "$DEVICE" --quick \
    --json "$OUT/gpu_bench.json" 2>"$OUT/gpu_bench.err" | tee "$OUT/gpu_bench.md"
  rc=${PIPESTATUS[0]}; echo "gpu_bench exit status: $rc" | tee -a "$OUT/gpu_bench.md"; [ "$rc" = 0 ] || status=1
fi

ls -l "$OUT"
exit $status
