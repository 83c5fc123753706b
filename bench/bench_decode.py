"""Decode/prefill benchmark on full-size ZAYA1-8B shapes with random weights: `zaya bench`, as a script.

    python bench/bench_decode.py --quant bf16,mxfp4 --batch 1,8 --plain

Everything is in zaya_mlx/benchmark.py; bench/README.md lists the benchmarks and bench/RESULTS.md the figures.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from zaya_mlx.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "bench", *sys.argv[1:]]
    main()
