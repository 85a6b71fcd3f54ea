"""The one base class of every error mergekit-lrp reports as a one-line message.

The CLIs and the merge guard catch :class:`LrpError` and print its message; any other
exception is a bug and keeps its traceback. It derives from ``ValueError`` because every
such error is a bad value given by the user (a file, an option, a model).
"""


class LrpError(ValueError):
    """Bad input to mergekit-lrp; the message names the file, tensor or option and the fix."""
