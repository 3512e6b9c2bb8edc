"""Exceptions shared by every room. None of them knows about gRPC; ``common.serving.server`` maps them to status codes."""
from __future__ import annotations


class SplitExitError(Exception):
    """Base class for errors the product reports to a user in one line."""


class ConfigError(SplitExitError):
    """A configuration, command-line value or bundle is unusable."""


class RequestError(SplitExitError):
    """A request a tier cannot serve. ``code`` names the gRPC status the servicer returns."""

    code = "INTERNAL"


class InvalidRequest(RequestError):
    """The request itself is malformed (bad tensor, duplicate sample ids, ...)."""

    code = "INVALID_ARGUMENT"


class PreconditionFailed(RequestError):
    """The request is well formed but not meant for this tier (wrong model id, wrong input shape)."""

    code = "FAILED_PRECONDITION"


class DownstreamError(RequestError):
    """The next tier failed to answer the forwarded samples. ``code`` says what that means for our caller."""

    def __init__(self, message: str, code: str = "UNAVAILABLE") -> None:
        super().__init__(message)
        self.code = code


QUOTE_LIMIT = 64


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """A caller-supplied string as it may appear in a status message or a log line: escaped like ``repr`` (so a
    newline cannot start a forged log line) and cut to ``limit`` characters (so a 1 MiB dtype cannot blow up a reply's
    metadata or a log). Every place that quotes a caller's string uses this one helper."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
