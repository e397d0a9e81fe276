"""User mistakes are reported as one line; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """A mistake in config or input that the user can fix; printed as one line, exit code 2."""
