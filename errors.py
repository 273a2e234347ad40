"""The one exception type for user errors: bad config, CLI argument, data file or checkpoint.

The CLI prints its message as one line and exits with code 2; anything else is a real bug and may
show a traceback.
"""


class UserError(Exception):
    """Input the user can fix. The message names what is wrong and how to fix it."""

    exit_code = 2
