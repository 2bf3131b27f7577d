"""One exception type for every input problem a user can fix.

The CLI prints the message as one line and exits with code 2; library callers can catch it.
"""


class SparsesegError(Exception):
    """Bad input: the message names the file or argument and the problem."""


def one_line(exc: BaseException) -> str:
    """An exception's message squeezed onto one line (for embedding in a SparsesegError)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class SparsesegWarning(UserWarning):
    """Input that is accepted but probably not what was meant (the CLI prints it in yellow)."""
