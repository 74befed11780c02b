"""The errors a user can cause. The CLI maps every `UserError` to exit code 2 with its message,
which names the field, file and line."""

class UserError(ValueError):
    """Something the user gave (config, data file, path, argument) is wrong: exit code 2.

    The message names the field, file and line. Data loaders of every role raise subclasses.
    """


class ConfigError(UserError):
    """A user error in a config file or override: the message names the key, file and line."""


class DataError(UserError):
    """A bad line in a data file: the message names the file and the line."""
