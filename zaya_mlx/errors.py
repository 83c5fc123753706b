"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class ZayaError(Exception):
    """A user-facing error: the message is one line that says what is wrong and, where it can, what to do."""
