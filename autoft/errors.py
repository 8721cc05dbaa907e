"""Exceptions raised by autoft's library code.

Library code raises these; only the CLI turns them into messages and exit codes.
Every message says what was wrong, where (file / field / value) and what was expected.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class AutoftError(Exception):
    """Base class for every error autoft raises on purpose."""


class ConfigError(AutoftError, ValueError):
    """A task file, search-space file or configuration value is invalid."""

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None):
        self.file = file
        self.field = field
        where = []
        if file:
            where.append(str(file))
        if field:
            where.append(f"field '{field}'")
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class DataError(AutoftError, ValueError):
    """A data source is missing, empty or unusable."""


class WeightsError(AutoftError):
    """Pretrained weights are missing, unreachable or do not verify."""


class UnknownBackboneError(AutoftError, KeyError):
    """A backbone name is not in the zoo."""

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0])


class TrialFailed(AutoftError):
    """One fine-tuning run failed (NaN loss, out of memory, ...); the study goes on."""


class ExportError(AutoftError):
    """An exported model folder is missing something or was altered."""


def did_you_mean(value: str, options: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' when a close match exists, else ''."""
    matches = difflib.get_close_matches(str(value), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""
