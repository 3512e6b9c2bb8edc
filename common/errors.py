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
