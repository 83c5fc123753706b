"""Markovian RSA with the Python API: rounds of parallel rollouts, each continuing from tails of the last round.

    python examples/rsa.py                                        # Zyphra/ZAYA1-8B, the laptop preset
    python examples/rsa.py --model ZAYA1-8B-mxfp4 --preset report # a quantized copy, the paper's setting
    python examples/rsa.py --n 8 --rounds 3 "Find all real x with x^2 - 5x + 6 = 0."

Same as `zaya rsa "PROBLEM" ...`. The events printed here are the ones the CLI's live view is drawn from.
"""

import argparse

import zaya_mlx
from zaya_mlx import rsa

PROBLEM = ("Let N be the number of ordered pairs of positive integers (a, b) with a + b = 30 and gcd(a, b) = 1. "
           "Find N.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("problem", nargs="?", default=PROBLEM)
    parser.add_argument("--model", default="Zyphra/ZAYA1-8B", help="hub repo id or local folder")
    parser.add_argument("--preset", default="laptop", choices=sorted(rsa.PRESETS))
    parser.add_argument("--n", type=int, help="population (default: the preset's)")
    parser.add_argument("--rounds", type=int, help="aggregation rounds after round 0 (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, tokenizer = zaya_mlx.load(args.model)

    def on_event(e: rsa.RSAEvent) -> None:
        if e.kind == "plan":
            print(e.data["plan"].summary())
        elif e.kind == "answer_extracted":
            print(f"  round {e.round} rollout {e.rollout}: {e.data['answer']!r} ({e.data['kind']})")
        elif e.kind == "round_finished":
            print(f"round {e.round}: {e.data['tokens']} tokens, {e.data['tokens_per_s']:.1f} tok/s")

    result = rsa.run(model, tokenizer, args.problem, n=args.n, rounds=args.rounds, seed=args.seed,
                     preset=args.preset, on_event=on_event)
    print(f"answer: {result.answer}  votes: {result.votes}")
    # Every round is kept: rollouts with their parents (which tails they were given), tokens, tails and answers.
    last = result.rounds[-1]
    print(f"the winner (rollout {result.winner}) aggregated tails of rollouts "
          f"{last.rollouts[result.winner].parents if result.winner >= 0 else '-'} of round {last.index - 1}")


if __name__ == "__main__":
    main()
