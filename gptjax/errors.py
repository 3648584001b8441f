"""Errors that name the bad input, so a user can fix it without reading a traceback."""


class ConfigError(ValueError):
    """A config field is invalid; the message names the field (e.g. `model.n_heads`)."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.detail = message
        super().__init__(f"config.{field}: {message}")


class CheckpointError(ValueError):
    """A checkpoint cannot be used here: corrupt, or saved with other shapes, dtypes, a
    different tokenizer or incompatible data settings; the message says which and why."""
