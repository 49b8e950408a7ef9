"""The one exception type that means "the user gave us bad input".

The CLI turns it into a single line on stderr and exit code 2; everything else is a bug and keeps its traceback.
"""


class AllocMoeError(ValueError):
    """Bad input: the message says what is wrong and what is allowed."""
