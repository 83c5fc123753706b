"""One host of a distributed `zaya rsa` in the tests, started by mlx.launch: runs the CLI on the arguments after
its own options, which act on one host only:

    --model-on RANK=PATH   host RANK loads the model at PATH (a mismatched model)
    --die RANK:N           host RANK's process ends at once after its N-th finished rollout (a host lost mid-round)
"""

import os
import sys


def main() -> None:
    rank = int(os.environ.get("MLX_RANK", "0"))
    args = sys.argv[1:]
    while args and args[0] in ("--model-on", "--die"):
        option, value, args = args[0], args[1], args[2:]
        if option == "--model-on":
            on, path = value.split("=", 1)
            if int(on) == rank:
                args[args.index("--model") + 1] = path
        else:
            on, after = map(int, value.split(":"))
            if on == rank:
                die_after(after)
    from zaya_mlx.cli import main as zaya

    sys.argv = ["zaya", *args]
    zaya()


def die_after(n: int) -> None:
    from zaya_mlx.rsa import engine

    record, seen = engine.Engine.record, []

    def dying(self, rollout):
        record(self, rollout)
        seen.append(rollout)
        if len(seen) == n:
            os._exit(9)

    engine.Engine.record = dying


if __name__ == "__main__":
    main()
