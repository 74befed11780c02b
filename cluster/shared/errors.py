"""The errors the CLI maps to exit codes: a `UserError` (bad config, data, path or argument)
to 2, with its message naming the field, file and line; a `RunError` (a run that cannot go
on) to 1, with its message naming the newest checkpoint. And the errors the learner raises
to the loop, which turns them into a `RunError` naming the checkpoint."""


class UserError(ValueError):
    """Something the user gave (config, data file, path, argument) is wrong: exit code 2.

    The message names the field, file and line. Data loaders of every role raise subclasses.
    """


class ConfigError(UserError):
    """A user error in a config file or override: the message names the key, file and line."""


class DataError(UserError):
    """A bad line in a data file: the message names the file and the line."""


class RunError(RuntimeError):
    """The run cannot go on (its roles did not come up in time, no actor left, the learner died
    or hung, too many NaN updates): exit code 1.

    Its message says what happened and where the newest checkpoint is."""


class NonFiniteUpdatesError(RuntimeError):
    """Too many consecutive updates had NaN or Inf in their rewards, losses or gradients."""


class WorkerDiedError(RuntimeError):
    """A worker of a sharded learner died: the learner cannot go on."""
