"""Errors a user can cause: the CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input (a path, a config value, a device name), not a bug.

    The message must stand alone on one line and say what to fix.
    """
