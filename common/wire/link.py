"""Link emulation arithmetic: how long a request/reply exchange takes on a link of given rate and round-trip time.

The model is deliberately simple and stated once: one exchange costs one round trip plus the time to clock every
byte of the serialized request and reply through the link at its rate,

    delay = RTT + (request bytes + reply bytes) * 8 / rate

with no queueing, loss, TCP slow start or framing overhead beyond the protobuf message itself. A tier with
``--link RATE,RTT`` sleeps this delay around each call to its next tier, so the latency the client measures
contains the link. Pure arithmetic, no I/O.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

from common.errors import ConfigError

_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"


@dataclass(frozen=True)
class LinkModel:
    """A link of ``rate_bps`` bits per second and ``rtt_s`` seconds of round-trip time."""

    rate_bps: float
    rtt_s: float

    def delay_s(self, request_bytes: int, reply_bytes: int) -> float:
        """Seconds one exchange of ``request_bytes`` out and ``reply_bytes`` back takes on this link."""
        return self.rtt_s + (request_bytes + reply_bytes) * 8.0 / self.rate_bps

    def __str__(self) -> str:
        return f"{format_rate(self.rate_bps)},{self.rtt_s * 1e3:g}ms"


def format_rate(bps: float) -> str:
    for unit, factor in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bps >= factor:
            return f"{bps / factor:g}{unit}"
    return f"{bps:g}bit"


def _parse(value: str, units: dict[str, float], what: str, example: str) -> float:
    m = re.fullmatch(_NUMBER + r"\s*([a-z]+)", value.strip().lower())
    if not m or m.group(2) not in units:
        raise ConfigError(f"bad {what} {value!r}: expected a number and one of {', '.join(units)}, e.g. {example}")
    return float(m.group(1)) * units[m.group(2)]


def parse_link(spec: str) -> LinkModel:
    """``"10mbit,20ms"`` -> ``LinkModel``; ``ConfigError`` with one readable line on anything else."""
    rate_text, sep, rtt_text = spec.partition(",")
    if not sep:
        raise ConfigError(f"bad link {spec!r}: expected RATE,RTT, e.g. 10mbit,20ms")
    rate = _parse(rate_text, _RATE_UNITS, "link rate", "10mbit")
    rtt = _parse(rtt_text, _TIME_UNITS, "round-trip time", "20ms")
    if rate <= 0:
        raise ConfigError(f"bad link {spec!r}: the rate must be positive")
    return LinkModel(rate, rtt)


def emulate_link(link: LinkModel | None, request_bytes: int, reply_bytes: int) -> float:
    """Sleep the emulated delay of one exchange on ``link`` (nothing without one); return it in ms."""
    if link is None:
        return 0.0
    delay = link.delay_s(request_bytes, reply_bytes)
    time.sleep(delay)
    return delay * 1e3


class StreamLinkClock:
    """The same link model for one request answered by a stream of replies.

    Sending the request costs half the round trip plus its bytes; a reply received (on loopback) at ``received_at``
    arrives over the emulated link half a round trip later plus its bytes' time, but never before the previous reply
    has been clocked through. A single reply therefore costs exactly ``LinkModel.delay_s``, and replies that follow
    one another closely share the round trip instead of each paying it.
    """

    def __init__(self, link: LinkModel | None, monotonic=time.monotonic, sleep=time.sleep) -> None:
        self.link = link
        self._monotonic, self._sleep = monotonic, sleep
        self._free = 0.0  # monotonic time at which the link has delivered every earlier reply

    def send(self, request_bytes: int) -> float:
        """Sleep the uplink part of the exchange; return it in ms."""
        if self.link is None:
            return 0.0
        delay = self.link.rtt_s / 2 + request_bytes * 8.0 / self.link.rate_bps
        self._sleep(delay)
        return delay * 1e3

    def receive(self, reply_bytes: int, received_at: float) -> float:
        """Sleep until the reply received at ``received_at`` (``time.monotonic()``) would have arrived; ms slept."""
        if self.link is None:
            return 0.0
        arrival = max(received_at + self.link.rtt_s / 2, self._free) + reply_bytes * 8.0 / self.link.rate_bps
        self._free = arrival
        delay = arrival - self._monotonic()
        if delay > 0:
            self._sleep(delay)
        return max(delay, 0.0) * 1e3
