"""Exec probe for a tier whose gRPC port demands mutual TLS, which the kubelet's built-in ``grpc:`` probe cannot speak.

Asks the standard ``grpc.health.v1`` service on ADDR and exits 0 when it answers SERVING. With ``--live`` any answer
counts (SERVING or NOT_SERVING): the process is up and its server responds, which is what a liveness probe should
ask -- a tier reports NOT_SERVING while loading, draining or while its *next* tier is down, and restarting the edge
pool because the cloud pool is down would only make the outage worse. Exit 1 otherwise.

Needs only grpcio and grpcio-health-checking, which every tier already has. Standard library + grpc, no project
imports, so it keeps working whatever the package layout.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVER_NAME_ENV = "SPLITEXIT_PROBE_SERVER_NAME"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="healthcheck.py", description=__doc__.splitlines()[0])
    p.add_argument("--addr", default="127.0.0.1:50051", help="HOST:PORT of the tier (default 127.0.0.1:50051)")
    p.add_argument("--service", default="", help='health service name (default "": the whole tier)')
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer (default 2)")
    p.add_argument("--live", action="store_true", help="pass on any health answer, NOT_SERVING included")
    p.add_argument("--tls-dir", type=Path, default=None,
                   help="folder with tls.crt, tls.key and ca.crt: speak mutual TLS with this identity")
    p.add_argument("--server-name", default=os.environ.get(SERVER_NAME_ENV) or None,
                   help=f"name the tier's certificate is checked against (default ${SERVER_NAME_ENV})")
    return p


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    if args.tls_dir is None:
        return grpc.insecure_channel(args.addr)
    files = {name: (args.tls_dir / name).read_bytes() for name in ("tls.crt", "tls.key", "ca.crt")}
    creds = grpc.ssl_channel_credentials(root_certificates=files["ca.crt"], private_key=files["tls.key"],
                                         certificate_chain=files["tls.crt"])
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.addr, creds, options=options)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        with open_channel(args) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except (grpc.RpcError, OSError) as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    ok = reply.status == health_pb2.HealthCheckResponse.SERVING or args.live
    print(f"{'ok' if ok else 'unhealthy'}: {status}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
