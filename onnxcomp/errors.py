"""Exceptions that the CLI maps to exit codes (0 ok, 1 validation failed, 2 bad input, 3 internal)."""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_VALIDATION_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most `limit` characters), or its type name."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__


class OnnxcompError(Exception):
    """Base class: an error whose message is fit to show a user as one line."""

    exit_code = EXIT_INTERNAL


class BadInputError(OnnxcompError):
    """The user's file, data, flag or pipeline is unusable (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class PipelineSyntaxError(BadInputError):
    """A pipeline string or recipe that does not parse; the message points at the bad token."""


class ValidationFailed(OnnxcompError):
    """A model did not meet the requested tolerance (exit 1): a result, not a crash.

    Carries the run's report (and the failing model, when there is one) so callers can still save
    or print them.
    """

    exit_code = EXIT_VALIDATION_FAILED

    def __init__(self, message: str, report: Any = None, model: Any = None):
        super().__init__(message)
        self.report = report
        self.model = model
