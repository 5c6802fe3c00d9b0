"""User-facing errors.

Every mistake a user can make (a bad spec, a missing file, a feature id out of
range, an SAE that does not fit the model) is raised as a `SteerError` whose
message says what was wrong, where (file, field, line) and what is allowed.
The CLI prints that one line and exits 2. Never raise a SteerError for a bug in
steer itself: those should surface as ordinary exceptions.
"""

from __future__ import annotations


class SteerError(Exception):
    """A problem with the user's input, reported as one line."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None):
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class SpecError(SteerError):
    """An edit spec (YAML, JSON or DSL) that does not parse or validate."""


class SAEError(SteerError):
    """An SAE file that cannot be read, or does not fit the model or site."""


class ModelError(SteerError):
    """A model that cannot be found, loaded or adapted."""
