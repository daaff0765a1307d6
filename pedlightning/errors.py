"""User-facing errors. The CLI prints these as one clear message, without a traceback."""

from __future__ import annotations


class PedLightningError(Exception):
    """Base of every error caused by the user's input (config, data on disk, checkpoint file)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(PedLightningError, ValueError):
    """A configuration value is invalid or inconsistent with the data."""


class DatasetLayoutError(PedLightningError, FileNotFoundError):
    """A dataset on disk does not have the expected layout.

    The message names the offending path, says what was expected and, when given, shows the expected tree.
    """

    def __init__(self, message: str, expected_layout: str | None = None):
        if expected_layout:
            message = f"{message}\nExpected layout:\n{expected_layout.rstrip()}"
        super().__init__(message)


class CheckpointError(PedLightningError, ValueError):
    """A checkpoint file cannot be read or does not fit the model it is loaded into."""


class EvaluationError(PedLightningError, ValueError):
    """Evaluation inputs are malformed or cannot produce a metric (e.g. no query has a valid gallery match)."""
