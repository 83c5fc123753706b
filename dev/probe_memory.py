"""What a bare read costs on this GPU: probe kernels that only read (MLX-CUDA), at the sizes a decode step touches.

Each thread loads 16 bytes and writes 4. Sizes: 64 KB, one expert's MXFP4 gate/up (4.2 MB, a different expert
each call) and all 16 experts (67 MB), from an array an op made (the GPU's memory pool) and from one made from
host data (managed memory). Prints the wall clock a call with 64 independent calls in one graph; for each
kernel's own GPU time, run it under Nsight Compute with --ncu (no timing, 4 calls of each):

    python3 dev/probe_memory.py
    ncu --metrics gpu__time_duration.sum,lts__t_sector_hit_rate.pct --csv -k regex:probe python3 dev/probe_memory.py --ncu

docs/PERFORMANCE.md says what bounds the expert kernels.
"""

import argparse
import sys
import time

import mlx.core as mx
import numpy as np

E, ROWS, WORDS = 16, 4096, 256  # ZAYA1-8B's MXFP4 gate/up stack: [16, 4096, 256] uint32
N4 = ROWS * WORDS // 4  # 16-byte loads an expert

SOURCE = """
    const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
    const uint4 u = reinterpret_cast<const uint4*>(w)[size_t(first[0]) * N4 + i];
    out[i] = u.x ^ u.y ^ u.z ^ u.w;
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ncu", action="store_true", help="launch each probe 4 times, untimed (for Nsight Compute)")
    args = ap.parse_args(argv)
    if not mx.cuda.is_available():
        print("MLX-CUDA is not available here: nothing to probe")
        return 1
    probe = mx.fast.cuda_kernel(name="probe_read", input_names=["w", "first"], output_names=["out"], source=SOURCE)
    from_op = mx.random.randint(0, 2**31, (E, ROWS, WORDS)).astype(mx.uint32)
    from_host = mx.array(np.random.default_rng(0).integers(0, 2**31, (E, ROWS, WORDS), dtype=np.uint32))
    firsts = [mx.array([e], dtype=mx.int32) for e in range(E)]
    mx.eval(from_op, from_host, firsts)

    def read(w, first, n):
        return probe(inputs=[w, firsts[first]], template=[("N4", N4)], grid=(n, 1, 1), threadgroup=(256, 1, 1),
                     output_shapes=[(n,)], output_dtypes=[mx.uint32])[0]

    cases = [
        ("64 KB", 4096, lambda i: read(from_op, i % E, 4096)),
        ("4.2 MB: one expert (op output)", N4, lambda i: read(from_op, i % E, N4)),
        ("67 MB: all experts (op output)", N4 * E, lambda i: read(from_op, 0, N4 * E)),
        ("4.2 MB: one expert (host data)", N4, lambda i: read(from_host, i % E, N4)),
        ("67 MB: all experts (host data)", N4 * E, lambda i: read(from_host, 0, N4 * E)),
    ]
    for name, loads, fn in cases:
        mx.eval([fn(i) for i in range(4)])
        mx.synchronize()
        if args.ncu:
            continue
        calls = 64
        t0 = time.perf_counter()
        mx.eval([fn(i) for i in range(calls)])
        mx.synchronize()
        dt = (time.perf_counter() - t0) / calls
        print(f"{name:32s} {dt * 1e6:8.1f} us a call in one graph, {loads * 16 / dt / 1e9:8.1f} GB/s read")
    return 0


if __name__ == "__main__":
    sys.exit(main())
