"""The one exception type for user errors, and the exit codes of ``chimera`` commands.

The CLI prints a ``UserError``'s message as one line and exits with code 2; anything else is a real
bug and may show a traceback.

Exit codes (a scheduler tells them apart):

* 0 (``EXIT_OK``): done; a training run reached ``train.steps`` (or ``train.stop_after``);
* 2 (``EXIT_USER_ERROR``): bad input (config, argument, data, checkpoint), nothing started or nothing lost;
* 75 (``EXIT_STOPPED``, EX_TEMPFAIL): a run stopped early by a signal (preemption, Ctrl-C) or by the time limit,
  after saving a checkpoint: running the same command again (or requeueing the job) resumes it;
* 130: stopped at once by a second Ctrl-C, without saving;
* anything else: a failure (a crashed rank, a bug).
"""

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_STOPPED = 75
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Input the user can fix. The message names what is wrong and how to fix it."""

    exit_code = EXIT_USER_ERROR
