"""Errors that name the bad input, so a user can fix it without reading a traceback."""


class ConfigError(ValueError):
    """A config field is invalid; the message names the field (e.g. `model.n_heads`)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"config.{field}: {message}")
