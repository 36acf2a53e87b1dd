"""Errors caused by what the user asked for (a config, a data file, a checkpoint).

The command line prints their message alone, without a traceback, and exits with status 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained by the message."""


class ConfigError(UserError, ValueError):
    """An unknown config key, a value of the wrong type, or an inconsistent setting."""


class DataError(UserError, ValueError):
    """A missing or malformed data file, or data that does not fit the configuration."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""
