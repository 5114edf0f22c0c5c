"""Errors a user can cause. The CLI turns them into one line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a config, a path, a model name, a corpus. Message names the problem and the fix."""
