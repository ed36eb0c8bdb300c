"""The one exception type for bad user input.

Anything a user can fix (a malformed data file, an unknown config key, a missing model path) raises `UserError`
with one readable line; the CLI turns it into exit code 2 without a traceback unless `--debug` is given.
"""


class UserError(Exception):
    """Bad input that the user can fix. The message is shown as is, on one line."""
