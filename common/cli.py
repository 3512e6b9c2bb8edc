"""Shared command-line plumbing: address parsing and a runner that turns product errors into one readable line."""
from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path
from typing import Callable

from common.errors import ConfigError, SplitExitError
from common.plugins import add_plugin_arg


def address(value: str) -> str:
    """argparse type for ``HOST:PORT`` (port 0 = pick a free port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, e.g. 127.0.0.1:50051, got {value!r}")
    return value


def _host_port(value: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``HOST:PORT`` (an IPv6 host in brackets), or None if it is not one."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535 or any(c in host for c in " ,/"):
        return None
    return host, int(port)


def _ip_version(host: str) -> int | None:
    """4 or 6 for an IP literal (IPv6 in brackets), None for a name."""
    try:
        if host.startswith("[") and host.endswith("]"):
            return ipaddress.IPv6Address(host[1:-1]).version
        return ipaddress.IPv4Address(host).version
    except ValueError:
        return None


def target(value: str) -> str:
    """argparse type for a gRPC target: ``HOST:PORT``, a comma-separated list of IP ``HOST:PORT`` (returned as the
    ``ipv4:`` or ``ipv6:`` target gRPC balances over), an ``ipv4:``/``ipv6:`` list, or ``dns:///NAME:PORT``."""
    bad = (f"expected HOST:PORT, a comma-separated list of IP:PORT, ipv4:/ipv6:IP:PORT,... or dns:///NAME:PORT, "
           f"got {value!r}")
    if value.startswith("dns:"):
        rest = value[len("dns:"):]
        if rest.startswith("//"):  # dns://[authority]/name:port; the authority (a DNS server) may be empty
            authority, slash, rest = rest[2:].partition("/")
            if not slash:
                raise argparse.ArgumentTypeError(bad)
        if _host_port(rest) is None:
            raise argparse.ArgumentTypeError(f"{bad} (a dns: target needs NAME:PORT)")
        return value
    scheme, sep, rest = value.partition(":")
    if scheme in ("ipv4", "ipv6") and sep:
        hosts = [_host_port(a) for a in rest.split(",")]
        if not all(hosts) or any(_ip_version(h) != int(scheme[-1]) for h, _ in hosts):
            raise argparse.ArgumentTypeError(f"{bad} (every address of an {scheme}: list must be an {scheme} IP:PORT)")
        return value
    parts = value.split(",")
    hosts = [_host_port(a) for a in parts]
    if not all(hosts):
        raise argparse.ArgumentTypeError(bad)
    if len(parts) == 1:
        return value
    versions = {_ip_version(h) for h, _ in hosts}
    if None in versions or len(versions) != 1:
        raise argparse.ArgumentTypeError(f"{bad} (a list must be all IPv4 or all IPv6 addresses; for a name with "
                                         f"several addresses use dns:///NAME:PORT)")
    return f"ipv{versions.pop()}:{value}"


def port(value: str) -> int:
    """argparse type for a TCP port number (0 = pick a free one)."""
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0..65535, got {value!r}")
    return int(value)


def _checked_number(value: str, cast: Callable[[str], float], ok: Callable[[float], bool], what: str):
    """Parse ``value`` with ``cast`` and accept it only if ``ok``; otherwise one argparse error naming ``what``."""
    try:
        x = cast(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
    if not ok(x):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    return x


def positive_int(value: str) -> int:
    """argparse type for an integer > 0."""
    return _checked_number(value, int, lambda n: n > 0, "a positive integer")


def positive_float(value: str) -> float:
    """argparse type for a finite number > 0."""
    return _checked_number(value, float, lambda x: 0 < x < float("inf"), "a positive number")


def non_negative_float(value: str) -> float:
    """argparse type for a finite number >= 0."""
    return _checked_number(value, float, lambda x: 0 <= x < float("inf"), "a number >= 0")


def tier_counts(value: str) -> dict[str, int]:
    """argparse type for ``TIER=N,...`` (``edge=2,cloud=3``): a positive count per named tier."""
    counts = {}
    for item in value.split(","):
        tier, sep, n = item.partition("=")
        if not sep or not tier or not n.isdigit() or int(n) < 1 or tier in counts:
            raise argparse.ArgumentTypeError(f"expected TIER=N,... with N >= 1, e.g. edge=2,cloud=3, got {value!r}")
        counts[tier] = int(n)
    return counts


def exit_list(value: str) -> tuple[int, ...]:
    """argparse type for ``I,J,...``: exit indices (>= 0), e.g. the last exit of each tier of a split."""
    items = value.split(",")
    if not all(item.isdigit() for item in items):
        raise argparse.ArgumentTypeError(f"expected exit indices I,J,... (integers >= 0), e.g. 1,3, got {value!r}")
    return tuple(int(item) for item in items)


def tier_gates(values: list[str] | None) -> dict:
    """Parse repeated ``TIER=SPEC`` gate overrides (``device=confidence:0.9``) into ``{tier: Gate}``."""
    from common.model.gates import parse_gate

    gates = {}
    for v in values or []:
        tier, sep, spec = v.partition("=")
        if not sep or not tier or not spec:
            raise ConfigError(f"bad gate override {v!r}: expected TIER=SPEC, e.g. device=confidence:0.9")
        gates[tier] = parse_gate(spec)
    return gates


def add_data_args(parser: argparse.ArgumentParser, default: str | None = "synthetic:test",
                  default_help: str = "synthetic:test") -> None:
    """``--data``, ``--split`` and ``--limit``: which samples a command reads."""
    parser.add_argument("--data", default=default, help=f"data spec (default: {default_help})")
    parser.add_argument("--split", default="test", help="split when the spec names none (default: test)")
    parser.add_argument("--limit", type=positive_int, default=None, help="use at most this many samples")


def add_run_args(parser: argparse.ArgumentParser, gate_help: str) -> None:
    """The options shared by every command that streams a data set through a deployment and reports on it."""
    add_data_args(parser)
    parser.add_argument("--batch-size", type=positive_int, default=64, help="samples per request (default 64)")
    parser.add_argument("--report", type=Path, default=None, help="write the report JSON here")
    parser.add_argument("--policy", default=None,
                        help="exit policy stored in the bundle to use (e.g. mlp, cost, ensemble)")
    parser.add_argument("--gate", action="append", help=gate_help)
    add_plugin_arg(parser)


def emit_report(report: dict, args: argparse.Namespace) -> None:
    """Print the summary of a run and write its JSON report where ``--report`` says."""
    from common.emulation.report import format_summary, write_report

    report["data"] = args.data
    print(format_summary(report))
    if args.report:
        write_report(report, args.report)
        print(f"report written to {args.report}")


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run ``main`` and exit; a ``SplitExitError`` or ``OSError`` ends the program with one line on stderr."""
    try:
        code = main(argv)
    except (SplitExitError, OSError) as e:
        prog = sys.argv[0].rsplit("/", 1)[-1]
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
