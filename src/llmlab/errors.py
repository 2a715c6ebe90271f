"""User-facing errors: one line that names the field (or file) and the fix, never a deep traceback."""


class LLMLabError(Exception):
    """Base class for errors caused by user input; the CLI prints `error: <message>` and exits 2."""


class ConfigError(LLMLabError, ValueError):
    """A config value is wrong. The message names the field, what was given, and what is allowed."""


class CheckpointError(LLMLabError):
    """A checkpoint folder is missing, incomplete, corrupt or inconsistent with its config."""


class DataError(LLMLabError):
    """A dataset spec or record cannot be used."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (disk full, read-only, no permission). Still an OSError, so code
    that handles I/O failures keeps working; the previous checkpoint under that name is unchanged."""
