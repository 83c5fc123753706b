"""Markovian RSA with the Python API: Zyphra's recipe (or a smaller preset) on one problem.

    python examples/rsa.py                                  # Zyphra/ZAYA1-8B, the laptop preset
    python examples/rsa.py --preset zyphra                  # Zyphra's recipe as published (hours on a laptop)
    python examples/rsa.py --n 8 --t 3 "Find all real x with x^2 - 5x + 6 = 0."

Same as `zaya rsa "PROBLEM" ...`. The events printed here are the ones the CLI's view is drawn from.
"""

import argparse
import sys

import zaya_mlx
from zaya_mlx import rsa

PROBLEM = ("Let N be the number of ordered pairs of positive integers (a, b) with a + b = 30 and gcd(a, b) = 1. "
           "Find N.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("problem", nargs="?", default=PROBLEM)
    parser.add_argument("--model", default="Zyphra/ZAYA1-8B", help="hub repo id or local folder")
    parser.add_argument("--preset", default=rsa.DEFAULT_PRESET, choices=sorted(rsa.PRESETS))
    parser.add_argument("--n", type=int, help="population (default: the preset's)")
    parser.add_argument("--t", type=int, help="aggregation rounds after round 0 (default: the preset's)")
    parser.add_argument("--short-resp-len", type=int, help="new tokens a rollout before the last round")
    parser.add_argument("--max-tokens", type=int, help="new tokens a rollout in the last round")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    params = rsa.RSAParams.preset(args.preset, rsa_n=args.n, rsa_t=args.t, short_resp_len=args.short_resp_len,
                                  max_tokens=args.max_tokens)
    model, tokenizer = zaya_mlx.load(args.model)

    def on_event(e: rsa.RSAEvent) -> None:
        if e.kind == "plan":
            print(e.data["plan"].summary())
        elif e.kind == "rollout_finished":
            print(f"  round {e.round} rollout {e.rollout}: {e.data['tokens']} tokens, answer {e.data['answer']!r}")
        elif e.kind == "round_finished":
            print(f"round {e.round}: {e.data['tokens']} tokens in {e.data['seconds']:.1f} s")

    result = rsa.run(args.problem, params, model=model, tokenizer=tokenizer, seed=args.seed, on_event=on_event)
    print(f"answer: {result.answer}")
    print(f"rsa_metadata: {result.metadata}")
    # Every round is kept: each rollout with the candidates it was shown (parents) and what it carries on.
    final = result.finals[0]
    print(f"the final response aggregated rollouts {final.parents} of round {final.round - 1}")


if __name__ == "__main__":
    try:
        main()
    except zaya_mlx.ZayaError as e:  # bad input: one line, as the `zaya` command prints it
        sys.exit(f"error: {e}")
