"""The one base of every error that is the user's input, not a bug: a bad flag, file or
value. Apps print its message as one line (`error: ...`) and exit 1; anything else is a bug
and keeps its traceback."""


class UserError(ValueError):
    """Bad input; the message names the flag, file or value."""
