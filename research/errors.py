"""The one base of every error that is the user's input, not a bug: a bad flag, file or
value. Apps print its message as one line (`error: ...`) and exit 1; anything else is a bug
and keeps its traceback. And the exit statuses that are not errors of the input, which a
scheduler or a script reads (sysexits.h)."""

PREEMPTED_EXIT = 75      # EX_TEMPFAIL: stopped by a signal at a checkpoint; run it again
OUT_OF_SPACE_EXIT = 74   # EX_IOERR: the disk filled up; free space, then run it again


class UserError(ValueError):
    """Bad input; the message names the flag, file or value."""
