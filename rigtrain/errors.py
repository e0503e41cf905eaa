"""The one error type that means "the user's input is wrong" (exit code 2).

Everything else that escapes is a bug in rigtrain (exit code 1, with a traceback).
"""


class UserError(Exception):
    """Bad input: a usage mistake, config, data or rig file. The message is one line that
    names the file or field and says what to do."""
