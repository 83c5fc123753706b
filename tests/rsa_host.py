"""One host of a distributed `zaya rsa` in the tests, started by mlx.launch: runs the CLI on the arguments after
its own options, which act on one host only:

    --model-on RANK=PATH   host RANK loads the model at PATH (a mismatched model)
    --die RANK:N           host RANK's process ends at once after its N-th finished rollout (a host lost mid-round)
    --term-saving RANK     host RANK gets a SIGTERM as it starts saving an interrupted run (mlx.launch ends the hosts
                           that remain when one fails: its SIGTERM can come while the host saves)
"""

import os
import signal
import sys


def main() -> None:
    rank = int(os.environ.get("MLX_RANK", "0"))
    args = sys.argv[1:]
    while args and args[0] in ("--model-on", "--die", "--term-saving"):
        option, value, args = args[0], args[1], args[2:]
        if option == "--model-on":
            on, path = value.split("=", 1)
            if int(on) == rank:
                args[args.index("--model") + 1] = path
        elif option == "--die":
            on, after = map(int, value.split(":"))
            if on == rank:
                die_after(after)
        elif int(value) == rank:
            term_while_saving()
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


def term_while_saving() -> None:
    from zaya_mlx.rsa.runfolder import RunFolder

    write_rates = RunFolder.write_rates

    def terminated(self, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        write_rates(self, **kwargs)

    RunFolder.write_rates = terminated


if __name__ == "__main__":
    main()
