"""The errors vidit raises for bad input, each with a message that names what to change.

They live here, below every other module, so that a model, the trainer and a command-line tool
raise (and catch) the same classes without importing each other.
"""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the config key to change."""


class LoadError(RuntimeError):
    """A workdir, export, autoencoder or teacher that cannot be read as a vidit run."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored, or belongs to a different model config."""
