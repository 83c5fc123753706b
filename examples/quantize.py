"""Quantize ZAYA1-8B with the Python API, look at the report, and ask the quantized model a question.

    python examples/quantize.py                                   # Zyphra/ZAYA1-8B -> ZAYA1-8B-mxfp4
    python examples/quantize.py SRC OUT --recipe mixed            # any layout; a built-in recipe or a JSON file
    python examples/quantize.py SRC OUT --no-generate             # just quantize

Same as `zaya quantize SRC OUT --recipe ...`. The result also loads with `mlx_lm.load(OUT)` after `import zaya_mlx`.
"""

import argparse
import sys

from rich.console import Console

import zaya_mlx
from zaya_mlx.quantization import available_recipes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", nargs="?", default="Zyphra/ZAYA1-8B", help="hub repo id or local folder")
    parser.add_argument("out", nargs="?", default="ZAYA1-8B-mxfp4", help="the MLX folder to write")
    parser.add_argument("--recipe", default="mxfp4", help=f"{', '.join(available_recipes())} or a recipe JSON file")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--no-generate", action="store_true", help="skip the test question")
    args = parser.parse_args()

    def progress(what: str, done: int, total: int) -> None:  # the library reports; drawing is ours
        print(f"\r{100 * done / max(total, 1):3.0f}% {what[:60]:<60}", end="", file=sys.stderr, flush=True)

    report = zaya_mlx.quantize(args.src, args.out, recipe=args.recipe, force=args.force, progress=progress)
    print(file=sys.stderr)
    console = Console()
    console.print(report)  # per tensor group: format, size, bits per weight, relative reconstruction error
    console.print(f"{report.bytes / 1e9:.2f} GB at {report.bits_per_weight:.2f} bits per weight "
                  f"(source {report.source_bytes / 1e9:.2f} GB), {report.seconds:.0f} s")
    for s in report.skipped:  # tensors whose shape does not fit the recipe's group size stay unquantized
        console.print(f"kept unquantized: {s.name} {list(s.shape)}: {s.reason}")

    if not args.no_generate:
        from zaya_mlx.tokenizer import apply_chat_template

        model, tokenizer = zaya_mlx.load(report.out)
        prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "What is 17 * 23?"}])
        result = zaya_mlx.generate(model, tokenizer, prompt, max_tokens=512, temperature=0.6)
        console.print(f"[dim]{result.reasoning.strip()}[/dim]\n{result.answer.strip()}")


if __name__ == "__main__":
    try:
        main()
    except zaya_mlx.ZayaError as e:  # bad input: one line, as the `zaya` command prints it
        sys.exit(f"error: {e}")
