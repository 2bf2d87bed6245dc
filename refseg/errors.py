"""The base of refseg's own errors: problems with the user's input, files or settings."""


class RefsegError(Exception):
    """An error refseg reports in one line (bad input, a file that cannot be used, a refused run)."""
