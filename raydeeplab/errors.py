"""The one base class for mistakes a user can fix; the CLI prints these without a traceback."""


class UserError(ValueError):
    """Bad flag, config, model name or dataset layout; the message names the culprit."""
