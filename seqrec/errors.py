"""User-facing errors: each carries one clear line for the terminal (no traceback is shown for these)."""


class SeqrecError(Exception):
    """Base class for errors caused by the user's input (data, config, checkpoints), not by a bug."""


class DataError(SeqrecError):
    """A data file is missing, empty or malformed (the message names the file and, where known, the line)."""


class ConfigError(SeqrecError):
    """The composed config has unknown keys, wrong types or impossible values (all listed at once)."""


class CheckpointError(SeqrecError):
    """A checkpoint cannot be read (corrupt, truncated) or does not match the run."""


class TrainingError(SeqrecError):
    """Training cannot go on (e.g. the loss became NaN/inf); the last good checkpoint is kept."""
