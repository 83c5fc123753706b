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
