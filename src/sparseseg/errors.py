"""One exception type for every input problem a user can fix.

The CLI prints the message as one line and exits with code 2; library callers can catch it.
"""


class SparsesegError(Exception):
    """Bad input: the message names the file or argument and the problem."""
