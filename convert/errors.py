"""Exceptions that dsconv raises for problems a user can fix."""

from __future__ import annotations

__all__ = ["DsconvError", "ConversionError", "CheckpointError", "UsageError"]


class DsconvError(Exception):
    """Base class: the message names the layer, file or value and tells the user what to do."""


class ConversionError(DsconvError):
    """A layer could not be converted, or the converted model failed a check."""


class CheckpointError(DsconvError):
    """A checkpoint could not be read or written."""


class UsageError(DsconvError, ValueError):
    """An argument has an invalid value."""
