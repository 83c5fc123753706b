"""`zaya`: a thin typer CLI over the Python API. Each command only parses, calls the API and prints."""

import sys

import typer

from .errors import ZayaError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="ZAYA1 on MLX.")


def fail(message: str) -> None:
    """Print a one-line error and exit non-zero (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except ZayaError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


@app.command("quantize")
def quantize_command(
    src: str = typer.Argument(..., help="Hub repo id or local folder, in any layout the loader reads."),
    out: str = typer.Argument(..., help="The MLX folder to write (must not exist unless --force)."),
    recipe: str = typer.Option("mxfp4", "--recipe", "-r",
                               help="mxfp4 (default), affine4, affine8, mixed, nvfp4, mxfp8, or a recipe JSON file."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (atomically, at the end)."),
    shard_size: float = typer.Option(5.0, "--shard-size", help="GiB of weights per output shard."),
) -> None:
    """Quantize SRC into an MLX folder that zaya and mlx-lm load: quantized weights, config, tokenizer."""
    from rich.console import Console

    from .quantization import quantize

    if shard_size <= 0:
        fail("--shard-size must be positive")
    report = quantize(src, out, recipe=recipe, force=force, progress=True, max_shard_size=int(shard_size * (1 << 30)))
    Console().print(report.table())

