"""The one error type users see: a one-line message naming the problem (CLI: exit code 2)."""


class WorkbenchError(ValueError):
    """Bad input or an impossible request; the message is shown to the user as is."""
