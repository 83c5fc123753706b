#!/bin/bash
# The GPU kernel tests and the decode benchmark on an NVIDIA GPU with MLX-CUDA (or any GPU MLX runs on, for the
# parts that need no CUDA tool). Run from the repository root, with zaya-mlx and MLX-CUDA installed:
#
#     bash dev/run_on_device.sh tests bench        # what a change to a kernel or the decode step must pass
#     bash dev/run_on_device.sh nvcc               # the CUDA twins through nvcc (or NVRTC), no GPU needed
#
# Parts:
#   nvcc      compile every CUDA twin as MLX assembles it, and check registers and shared memory (dev/nvcc_check.py)
#   tests     tests/test_kernels.py's GPU tests, its groups (TEST_GROUPS) in parallel; on a fresh machine NVRTC
#             compiles every kernel variant first, so the expert group alone takes 2-4 minutes
#   bench     `zaya bench` (bf16 and MXFP4, batch 1 and 8, with the plain path): bench/bench_decode.py
#   quick     MXFP4, batch 1 only
#   longctx   MXFP4 at 1x256, 1x16384, 16x256, 16x16384 and 32x32768, bf16 and 8-bit KV: tokens/s, bytes a step and
#             the share of the bandwidth bound (bench/bench_decode.py --rows ... --kv bf16,8)
#   rsa       one RSA round at N = 16 with 16K-token prompts against 16 single streams, bf16 (bench/bench_rsa.py)
#   floor     MXFP4, batch 1, and the same graph with every kernel body emptied: the host's floor (dev/bench_lab.py)
#   vmlx      MXFP4, batch 1, against vMLX's port in the same run, given its models/zaya.py as .vmlx/zaya.py
#   kernels   each kernel's GPU time under Nsight Compute (bench/bench_kernels.py)
#   gpustep   the GPU's own time for a decode step, kernel by kernel, at batch 1 and 8 (dev/gpu_step.py under ncu;
#             GPUSTEP_ROWS: other batch x context pairs)
#   kdetail   one kernel launch under ncu's full set: stall reasons and its SASS line by line (KDETAIL_KERNEL,
#             KDETAIL_ONLY)
#   profile   one step's cost op by op (dev/profile_decode.py)
#   ab        this checkout's decode against other checkouts' (AB_OTHER: folders), interleaved AB_REPS times
#   ab1       one change on and off in one process (dev/ab_one_process.py; AB_WHAT: source, include, bodies,
#             cca-inside, heads, fused, attention or head-rows; AB_ARGS: more of its arguments, e.g. "--batch 16")
#   attn      attention's launch shapes (ATTN_CONFIGS: the attention module's constants, as dev/ab_one_process.py
#             --configs takes them) against the library's, at 16 x 16,384 and 1 x 16,384
#   longab    attention at 16 x 16,384: the CCA step inside or apart, and one query head or four a threadgroup
#   gpushare  a batch-16 step with each kernel's body emptied in turn (16 x 256: experts, residual norms, attention;
#             16 x 16,384: attention, experts), against the step as it is: their shares, without ncu
#   opsgraph  MLX-CUDA's ops a CUDA graph: each value in OPS_SWEEP in its own process, interleaved
#   native    the decode loop's native stacks under py-spy for NATIVE_SECONDS (dev/profile_native.py); needs py-spy
#             (on an offline machine, a wheel in dev/wheels/py-spy)
# Logs go to $OUT, or ./device-out.
set -u
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), 'cuda', mx.cuda.is_available())" | tee -a "$OUT/gpu.txt"
rc=0
for part in "$@"; do
  case "$part" in
    nvcc)
      python3 dev/nvcc_check.py 2>&1 | tee "$OUT/nvcc.log" || rc=1 ;;
    tests)
      # by group, all groups at once: on a fresh machine every kernel variant is compiled by NVRTC first (several
      # seconds each, one CPU core a process), which run one after another took over 560 s of a 600 s call.
      # Each group has its own time limit, log and MLX kernel cache (two processes writing one cache file race).
      IFS=';' read -r -a groups <<< "${TEST_GROUPS:-attention_kernel;cca_kernel;router_kernel or residual_norm_kernel or lm_head_kernel;expert_kernel;fused_decode}"
      pids=()
      for i in "${!groups[@]}"; do
        MLX_PTX_CACHE_DIR=/tmp/zaya-tests-ptx-$i timeout "${TEST_LIMIT:-500}" python3 -m pytest tests/test_kernels.py -q \
          -rs --noconftest -p no:cacheprovider -k "${groups[$i]}" > "$OUT/tests-$i.log" 2>&1 &
        pids+=($!)
      done
      for i in "${!groups[@]}"; do
        wait "${pids[$i]}" || rc=1
        sed "s/^/[${groups[$i]}] /" "$OUT/tests-$i.log" | tee -a "$OUT/tests.log"
      done ;;
    gpustep)
      # GPUSTEP_ROWS: batch x context pairs (default 1x256 8x256; RSA's regime: 16x256 16x16384 1x16384)
      for row in ${GPUSTEP_ROWS:-1x256 8x256}; do
        timeout 300 ncu --profile-from-start off --metrics gpu__time_duration.sum --csv --print-kernel-base function \
          --cache-control none --clock-control none python3 dev/gpu_step.py --experts 2 --batch "${row%x*}" \
          --context "${row#*x}" > "$OUT/gpustep-$row.csv" 2>&1 || rc=1
        python3 dev/gpu_step.py --summarize "$OUT/gpustep-$row.csv" | tee "$OUT/gpustep-$row.txt"
      done ;;
    profile)
      timeout 300 python3 dev/profile_decode.py --quant mxfp4 --batch 1 --json "$OUT/profile.json" 2>&1 | tee "$OUT/profile.log"
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    bench)
      timeout 560 python3 bench/bench_decode.py --quant bf16,mxfp4 --batch 1,8 --plain \
        --json "$OUT/bench.json" --markdown "$OUT/bench.md" 2>&1 | tee "$OUT/bench.log"
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    longctx)
      # batched decode at long context, bf16 and 8-bit KV (rows a GPU's memory cannot hold are skipped, and said)
      timeout 590 python3 bench/bench_decode.py --quant mxfp4 --rows 1x256,1x16384,16x256,16x16384,32x32768 \
        --kv bf16,8 --steps 32 --runs 3 --prefill-chunk 2048 \
        --json "$OUT/longctx.json" --markdown "$OUT/longctx.md" 2>&1 | tee "$OUT/longctx.log"
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    rsa)
      timeout 560 python3 bench/bench_rsa.py --ns 1,16 --c 4 --tail 4000 --decode 256 --mixed-n 0 \
        --json "$OUT/rsa.json" 2>&1 | tee "$OUT/rsa.log"
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    floor)
      timeout 400 python3 dev/bench_lab.py --quant mxfp4 --batch 1 --host-floor \
        --json "$OUT/floor.json" --markdown "$OUT/floor.md" 2>&1 | tee "$OUT/floor.log"
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    vmlx)
      if [ ! -f .vmlx/zaya.py ]; then echo "vmlx: put vMLX's models/zaya.py at .vmlx/zaya.py"; rc=2; continue; fi
      timeout 400 python3 dev/bench_lab.py --quant mxfp4 --batch 1 --vmlx .vmlx/zaya.py \
        --json "$OUT/vmlx.json" --markdown "$OUT/vmlx.md" 2>&1 | tee "$OUT/vmlx.log"
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    kernels)
      timeout 300 ncu --metrics gpu__time_duration.sum --csv -k regex:zaya \
        python3 bench/bench_kernels.py --batch 1,8 --calls 5 --reps 1 > "$OUT/kernels.csv" 2>&1 || rc=1
      python3 bench/bench_kernels.py --summarize "$OUT/kernels.csv" | tee "$OUT/kernels.txt" ;;
    kdetail)
      # one launch of a kernel under Nsight Compute's full set (stall reasons, memory, occupancy), and its SASS with
      # the samples a line: KDETAIL_KERNEL (a regex, default decode_attention) in the cases of bench_kernels.py
      # that KDETAIL_ONLY names (default: the CCA step inside attention with o_proj), the third launch; KDETAIL_ARGS:
      # bench_kernels.py's shape (default --batch 1; RSA's attention: "--batch 16 --context 16384" with KDETAIL_ONLY
      # "attention + o_proj, 16384")
      timeout 300 ncu --set full --import-source no -k "regex:${KDETAIL_KERNEL:-decode_attention}" -s 2 -c 1 \
        -f -o "$OUT/kdetail" python3 bench/bench_kernels.py ${KDETAIL_ARGS:---batch 1} --calls 2 --reps 1 \
        --only "${KDETAIL_ONLY:-CCA step + attention + o_proj}" > "$OUT/kdetail.log" 2>&1 || rc=1
      ncu -i "$OUT/kdetail.ncu-rep" --page details > "$OUT/kdetail.txt" 2>&1 || rc=1
      ncu -i "$OUT/kdetail.ncu-rep" --page source --csv --print-source sass > "$OUT/kdetail-sass.csv" 2>&1 || rc=1
      grep -E "Duration|Registers|Warp Cycles|Stall|Achieved|Block Size|Grid Size" "$OUT/kdetail.txt" | head -40 ;;
    ab)
      # decode speed of this checkout against other checkouts (`git archive` of other commits, say): AB_OTHER
      # is one folder, or several separated by spaces. On a 2-expert model (the same step; builds in seconds),
      # interleaved, AB_REPS times (default 3: a host's speed varies by tens of percent from run to run).
      # Each side first warms its own kernel cache, all sides at once (NVRTC compiles every variant on a fresh
      # machine): MLX-CUDA finds a compiled kernel by its name and template arguments, not by its source. Every
      # side needs `zaya bench --experts`. AB_BATCH: the batch sizes (default 1,8).
      sides=("$PWD")
      for other in ${AB_OTHER:-}; do
        if [ ! -d "$other" ]; then echo "ab: $other is not a folder"; rc=2; continue 2; fi
        sides+=("$(cd "$other" && pwd)")
      done
      if [ "${#sides[@]}" -lt 2 ]; then echo "ab: AB_OTHER must name the other checkout(s)"; rc=2; continue; fi
      tag_of() { [ "$1" = "$PWD" ] && echo this || basename "$1"; }
      for side in "${sides[@]}"; do
        MLX_PTX_CACHE_DIR=/tmp/zaya-ab-ptx-$(tag_of "$side") timeout 400 python3 "$side/bench/bench_decode.py" \
          --quant mxfp4 --batch 1,8 --experts 2 --steps 4 > "$OUT/ab_warm_$(tag_of "$side").log" 2>&1 &
      done
      wait
      for rep in $(seq "${AB_REPS:-3}"); do
        for side in "${sides[@]}"; do
          tag=$(tag_of "$side")
          MLX_PTX_CACHE_DIR=/tmp/zaya-ab-ptx-$tag timeout 250 python3 "$side/bench/bench_decode.py" --quant mxfp4 \
            --batch "${AB_BATCH:-1,8}" --experts 2 --json "$OUT/ab_${tag}_$rep.json" 2>&1 | grep -E "batch|rror" | sed "s/^/[$tag $rep] /"
        done
      done ;;
    opsgraph)
      # MLX-CUDA's ops a CUDA graph (MLX_MAX_OPS_PER_BUFFER, read once a process; `zaya` sets 200 unless it is set):
      # each value in OPS_SWEEP in its own process, interleaved AB_REPS times, 2-expert model, MXFP4, batch 1
      for rep in $(seq "${AB_REPS:-3}"); do
        for n in ${OPS_SWEEP:-100 200 250}; do
          MLX_MAX_OPS_PER_BUFFER=$n timeout 200 python3 bench/bench_decode.py --quant mxfp4 --batch 1 --experts 2 \
            --json "$OUT/ops_${n}_$rep.json" 2>&1 | grep -E "batch|rror" | sed "s/^/[ops $n, $rep] /"
        done
      done ;;
    ab1)
      # one change on and off, alternating in one process (no drift between processes): AB_WHAT (default source)
      timeout 500 python3 dev/ab_one_process.py --what "${AB_WHAT:-source}" --rounds "${AB_REPS:-6}" --steps 200 \
        ${AB_ARGS:-} 2>&1 | tee "$OUT/ab_one_process.log"
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    gpushare)
      # how much of a batch-16 step each kernel's GPU work is, without ncu: the step with those bodies emptied
      # against the step as it is, all sets in one process a context (each prompt filled once)
      for spec in "256 expert_mlp.h;residual_norm.h;decode_attention.h,attention_combine.h,cca_decode.h" \
                  "16384 decode_attention.h,attention_combine.h,cca_decode.h;expert_mlp.h"; do
        timeout 285 python3 dev/ab_one_process.py --what bodies --bodies "${spec#* }" --batch 16 \
          --context "${spec%% *}" --rounds 3 --steps 48 2>&1 | tee "$OUT/gpushare-${spec%% *}.log"
        [ "${PIPESTATUS[0]}" = 0 ] || rc=1
      done ;;
    attn)
      # attention's launch shapes against the library's, at 16 x 16,384 and 1 x 16,384, each row in one process
      configs=${ATTN_CONFIGS:-FUSED_COMBINE=1;LANES_PER_KEY=16;CHUNK=2048;HEADS_PER_THREADGROUP=4,LANES_PER_KEY=16,CHUNK=256}
      for row in 16x16384 1x16384; do
        timeout 280 python3 dev/ab_one_process.py --what attention --batch "${row%x*}" --context "${row#*x}" \
          --configs "$configs" --rounds 2 --steps 32 2>&1 | tee "$OUT/attn-$row.log"
        [ "${PIPESTATUS[0]}" = 0 ] || rc=1
      done ;;
    longab)
      # attention at 16 x 16,384, each comparison in one process (the prompt filled once; NVRTC compiles every
      # variant first, a minute or two on a fresh process): the CCA step inside vs apart, then apart with one query
      # head a threadgroup vs a KV head's four
      for what in cca-inside heads; do
        timeout 280 python3 dev/ab_one_process.py --what "$what" --batch 16 --context 16384 --rounds 3 --steps 48 \
          2>&1 | tee "$OUT/longab-$what.log"
        [ "${PIPESTATUS[0]}" = 0 ] || rc=1
      done ;;
    native)
      command -v py-spy > /dev/null || python3 -m pip install -q --no-index dev/wheels/py-spy/py_spy-*.whl
      timeout 300 python3 dev/profile_native.py --rate "${NATIVE_RATE:-25}" --seconds "${NATIVE_SECONDS:-12}" \
        --out "$OUT" 2>&1 | tee "$OUT/native.log"
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    quick)
      timeout 200 python3 bench/bench_decode.py --quant mxfp4 --batch 1 --steps 32 \
        --json "$OUT/quick.json" --markdown "$OUT/quick.md" 2>&1 | tee "$OUT/quick.log"
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    *) echo "unknown part: $part"; rc=2 ;;
  esac
done
exit $rc
