"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class ZayaError(Exception):
    """A user-facing error: the message is one line that says what is wrong and, where it can, what to do."""


def first_line(e: BaseException) -> str:
    """An exception's message in one line: its first, else the exception's type. A back end's messages (MLX's)
    run to several lines, which a one-line error, a log line or a report cell cannot hold."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
