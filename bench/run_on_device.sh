#!/bin/bash
# Kernel tests and the decode benchmark on an NVIDIA GPU with MLX-CUDA, for the device tool of this workplace
# (any machine with MLX-CUDA works the same: run from the repository root).
#
# MLX-CUDA reaches the offline machine as in ../shared/device/mlx-cuda.sh: `prepare` here writes .device/; then
#   call 1 (carry .device/p1 .device/stage.sh):               bash .device/stage.sh
#   call 2 (carry .device/p2 .device/stage.sh .device/env.sh .vmlx):
#       bash .device/stage.sh && . .device/env.sh && bash bench/run_on_device.sh tests bench
#   later calls on the same (warm) machine: . .device/env.sh && bash bench/run_on_device.sh ...
# Parts: nvcc (compile the CUDA twins offline), tests (tests/test_kernels.py), bench (bf16 + MXFP4, batch 1
# and 8, the plain path and vMLX's port when .vmlx/zaya.py is there), quick (MXFP4 batch 1 only).
# Logs go to $OUT (the device tool's folder) or ./device-out.
set -u
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), 'cuda', mx.cuda.is_available())" | tee -a "$OUT/gpu.txt"
VMLX=""
[ -f .vmlx/zaya.py ] && VMLX="--vmlx .vmlx/zaya.py"
rc=0
for part in "$@"; do
  case "$part" in
    nvcc)
      python3 bench/nvcc_check.py 2>&1 | tee "$OUT/nvcc.log" || rc=1 ;;
    tests)
      timeout 480 python3 -m pytest tests/test_kernels.py -q -rs --noconftest -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    bench)
      timeout 560 python3 bench/bench_decode.py --quant bf16,mxfp4 --batch 1,8 --plain $VMLX \
        --json "$OUT/bench.json" --markdown "$OUT/bench.md" 2>&1 | tee "$OUT/bench.log"
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    quick)
      timeout 200 python3 bench/bench_decode.py --quant mxfp4 --batch 1 --steps 32 \
        --json "$OUT/quick.json" --markdown "$OUT/quick.md" 2>&1 | tee "$OUT/quick.log"
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    *) echo "unknown part: $part"; rc=2 ;;
  esac
done
exit $rc
