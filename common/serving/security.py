"""Transport security and authentication of tiers: TLS / mutual TLS credentials and an optional bearer token.

One set of flags per tier (``add_security_args``): ``--tls-cert``/``--tls-key`` make the tier's server speak TLS;
``--tls-ca`` makes it demand a client certificate signed by that CA (mutual TLS) *and* makes the tier's channel to
its next tier use TLS verified by the same CA, presenting the tier's own certificate. ``--token-file`` (or the
``SPLITEXIT_TOKEN`` environment variable) names a bearer token that every call to the Tier service and to server
reflection must carry in ``authorization: Bearer ...``, and that the tier sends onward; the health service stays open
so load balancers and orchestrators can probe it. Secrets never appear on the command line.
"""
from __future__ import annotations

import argparse
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.errors import ConfigError

TOKEN_ENV = "SPLITEXIT_TOKEN"
OPEN_SERVICES = ("/grpc.health.v1.Health/",)  # callable without a token


@dataclass(frozen=True)
class Security:
    """What a tier (or client) needs to protect its links; all empty = plaintext and no token (loopback use)."""

    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    server_name: str | None = None  # name to verify the next tier's certificate against, if not its address
    token: str | None = None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.cert is None:
            return None
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=self.ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if self.ca is None:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [BearerTokenInterceptor(self.token)] if self.token else []


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuse (UNAUTHENTICATED) every call without ``authorization: Bearer <token>``, except health checks."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def deny(request_iterator, context):  # never reads the body: refused as soon as the headers are in
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        # A stream-unary handler is given the request iterator instead of a request read in advance, so a caller
        # without the token that never sends a body holds no worker thread waiting for it. The wire format of a
        # refusal does not depend on the handler's kind.
        self._deny = grpc.stream_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(OPEN_SERVICES):
            return continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):  # constant time: no guessing by timing
            return continuation(handler_call_details)
        return self._deny


def add_security_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate this tier presents (serving TLS)")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", type=Path, default=None,
                   help="PEM CA: clients must present a certificate it signed (mutual TLS), and the next tier is "
                        "reached over TLS verified by it")
    p.add_argument("--tls-server-name", default=None,
                   help="name the next tier's certificate is checked against (default: the host of --next)")
    p.add_argument("--token-file", type=Path, default=None,
                   help=f"file holding a bearer token callers must send and this tier sends on (or ${TOKEN_ENV})")


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {path}: {e.strerror}") from None


def security_from_args(args: argparse.Namespace) -> Security:
    """Read the files the flags name; a missing file or half a key pair is a ``ConfigError``."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    token = os.environ.get(TOKEN_ENV) or None
    if args.token_file is not None:
        token = (_read(args.token_file, "token file") or b"").decode().strip()
        if not token:
            raise ConfigError(f"the token file {args.token_file} is empty")
    return Security(_read(args.tls_cert, "certificate"), _read(args.tls_key, "private key"),
                    _read(args.tls_ca, "CA certificate"), args.tls_server_name, token)
