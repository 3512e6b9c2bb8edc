"""Local multi-process deployment: every tier of a bundle as its own OS process on loopback, started and stopped.

Each tier binds port 0 and writes the address it got to a ready file; tiers start last-to-first (each needs its next
tier's address), and the deployment is ready once every one reports SERVING on the gRPC health service. A tier may run
as several replicas (``replicas={"cloud": 2}``), each its own process on its own port; the tier before it gets all of
them as one ``--next`` target (an ``ipv4:``/``ipv6:`` list) and spreads its calls over them round robin. Stopping
sends SIGTERM with a grace period, then SIGKILL. Tier processes ask the kernel to send them SIGTERM should the
launching process die (Linux), so none is left orphaned.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from common.cli import target
from common.errors import SplitExitError
from common.model.bundle import find_tier_folders, read_manifest
from common.model.gates import Gate, format_gate
from common.serving.client import wait_for_serving
from common.serving.host import PARENT_PID_ENV
from common.serving.security import Security

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class TierProcess:
    tier: str
    process: subprocess.Popen
    log_path: Path
    address: str = ""
    replica: int = 0
    metrics_url: str | None = None  # http://HOST:PORT/metrics when the tier serves metrics (--metrics-port)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class LocalDeployment:
    """Context manager running every tier of a bundle as its own process; ``device_address`` is the entry point."""

    bundle: Path
    host: str = "127.0.0.1"
    gates: dict[str, Gate] = field(default_factory=dict)  # tier -> gate override
    policy: str | None = None  # stored exit policy every tier should use instead of its active one
    extra_args: dict[str, list[str]] = field(default_factory=dict)  # tier -> more command-line flags
    log_dir: Path | None = None
    # Optional hook (tier, next tier's address) -> address the tier should send to, e.g. a measuring proxy. With
    # replicas the "address" is the ipv4:/ipv6: list of the next tier's replicas.
    link: Callable[[str, str], str] | None = None
    security: Security | None = None  # how to reach the tiers' health service when they speak TLS
    startup_timeout_s: float = 120.0
    grace_s: float = 5.0
    replicas: dict[str, int] = field(default_factory=dict)  # tier -> number of processes (default 1)
    processes: list[TierProcess] = field(default_factory=list)

    @property
    def addresses(self) -> dict[str, str]:
        """Each tier's first replica's address."""
        return {p.tier: p.address for p in self.processes if p.replica == 0}

    @property
    def replica_addresses(self) -> dict[str, list[str]]:
        """Each tier's replicas' addresses, by replica index."""
        out: dict[str, list[str]] = {}
        for p in sorted(self.processes, key=lambda p: (self.tiers.index(p.tier), p.replica)):
            out.setdefault(p.tier, []).append(p.address)
        return out

    @property
    def device_address(self) -> str:
        return self.addresses[self.tiers[0]]

    def __post_init__(self) -> None:
        self.folders = find_tier_folders(self.bundle)
        self.tiers = [read_manifest(f).tier for f in self.folders]
        unknown = set(self.gates) - set(self.tiers)
        if unknown:
            raise SplitExitError(f"gate overrides name unknown tiers {sorted(unknown)}; tiers are {self.tiers}")
        unknown = set(self.replicas) - set(self.tiers)
        if unknown:
            raise SplitExitError(f"replica counts name unknown tiers {sorted(unknown)}; tiers are {self.tiers}")
        if any(n < 1 for n in self.replicas.values()):
            raise SplitExitError(f"replica counts must be at least 1, got {self.replicas}")
        if self.replicas.get(self.tiers[0], 1) != 1:
            raise SplitExitError(f"the {self.tiers[0]} tier is the entry point and runs as one process")

    def __enter__(self) -> "LocalDeployment":
        self._tmp = tempfile.TemporaryDirectory(prefix="splitexit-launch-")
        log_dir = Path(self.log_dir or self._tmp.name)
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            next_address = None
            for tier, folder in reversed(list(zip(self.tiers, self.folders))):
                started = [self._spawn(tier, r, folder, next_address, log_dir)
                           for r in range(self.replicas.get(tier, 1))]  # replicas load side by side
                for proc in started:
                    self._await_ready(proc)
                next_address = target(",".join(p.address for p in started))
            for proc in self.processes:
                wait_for_serving(proc.address, self.startup_timeout_s, self.security)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _ready_file(self, tier: str, replica: int) -> Path:
        return Path(self._tmp.name) / f"{tier}-{replica}.addr"

    def _spawn(self, tier: str, replica: int, folder: Path, next_address: str | None, log_dir: Path,
               port: int = 0) -> TierProcess:
        ready = self._ready_file(tier, replica)
        ready.unlink(missing_ok=True)
        if next_address and self.link and port == 0:  # a restart (port given) reuses the address it was told
            next_address = self.link(tier, next_address)
        self._launch = {**getattr(self, "_launch", {}), (tier, replica): (folder, next_address, log_dir)}
        cmd = [sys.executable, "-m", tier, "--bundle", str(folder), "--listen", f"{self.host}:{port}",
               "--ready-file", str(ready), "--grace", str(self.grace_s)]
        if next_address:
            cmd += ["--next", next_address]
        if self.policy:
            cmd += ["--policy", self.policy]
        if tier in self.gates:
            cmd += ["--gate", format_gate(self.gates[tier])]
        cmd += self.extra_args.get(tier, [])
        log_path = log_dir / (f"{tier}.log" if self.replicas.get(tier, 1) == 1 else f"{tier}-{replica}.log")
        with open(log_path, "ab") as log:
            # The tier asks the kernel to SIGTERM it when we die (see common.serving.tier.die_with_parent).
            env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
            popen = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env)
        proc = TierProcess(tier, popen, log_path, replica=replica)
        self.processes.append(proc)
        return proc

    def _await_ready(self, proc: TierProcess) -> None:
        """Wait for the tier's ready file; read its address (and its metrics URL from its log, if it serves one)."""
        ready = self._ready_file(proc.tier, proc.replica)
        deadline = time.monotonic() + self.startup_timeout_s
        while not ready.exists():
            if proc.process.poll() is not None:
                raise SplitExitError(f"the {proc.tier} tier exited with code {proc.process.returncode}:\n"
                                     f"{proc.log_tail()}")
            if time.monotonic() > deadline:
                raise SplitExitError(f"the {proc.tier} tier did not start within {self.startup_timeout_s:.0f} s")
            time.sleep(0.05)
        proc.address = ready.read_text().strip()
        # The tier logs its metrics address before it writes the ready file; a restart appends to the same log.
        urls = re.findall(r"metrics on (http://\S+/metrics)", proc.log_path.read_text(errors="replace"))
        proc.metrics_url = urls[-1] if urls else None

    def _process(self, tier: str, replica: int) -> tuple[int, TierProcess]:
        for i, p in enumerate(self.processes):
            if p.tier == tier and p.replica == replica:
                return i, p
        raise SplitExitError(f"no replica {replica} of the {tier} tier is running")

    def kill(self, tier: str, sig: int = signal.SIGKILL, replica: int = 0) -> None:
        """Send ``sig`` to one replica of a tier and reap it (fault tests); ``restart`` brings it back."""
        _, proc = self._process(tier, replica)
        proc.process.send_signal(sig)
        proc.process.wait(timeout=self.grace_s + 30)

    def restart(self, tier: str, replica: int = 0) -> TierProcess:
        """Start a replica of ``tier`` again on the address and with the flags it had; return once it is SERVING.

        Call it from a thread that outlives the tier: the kernel stops a tier when the *thread* that started it ends.
        """
        index, old = self._process(tier, replica)
        if old.process.poll() is None:
            raise SplitExitError(f"the {tier} tier (replica {replica}) is still running")
        self.processes.pop(index)
        folder, next_address, log_dir = self._launch[(tier, replica)]
        proc = self._spawn(tier, replica, folder, next_address, log_dir, port=int(old.address.rpartition(":")[2]))
        self.processes.insert(index, self.processes.pop())
        try:
            self._await_ready(proc)
        except BaseException:
            proc.process.kill()
            raise
        wait_for_serving(proc.address, self.startup_timeout_s, self.security)
        return proc

    def replica_counts(self, timeout_s: float = 5.0) -> dict[str, dict[str, dict[str, int]]]:
        """Per tier, per replica address: the Infer calls it answered (any status) and the samples it handled, read
        from its Prometheus metrics (tiers started with ``--metrics-port``; others are left out). Counts start at
        zero when a replica restarts."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for p in sorted(self.processes, key=lambda p: (self.tiers.index(p.tier), p.replica)):
            if p.metrics_url and p.process.poll() is None:
                out.setdefault(p.tier, {})[p.address] = scrape_counts(p.metrics_url, timeout_s)
        return out

    def stop(self) -> None:
        """SIGTERM every tier (entry point first), wait for the grace period, then SIGKILL what is left."""
        for proc in self.processes:
            if proc.process.poll() is None:
                proc.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s + 5.0
        for proc in self.processes:
            try:
                proc.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.process.kill()
                proc.process.wait()
        self.processes.clear()
        if hasattr(self, "_tmp"):
            self._tmp.cleanup()


def scrape_counts(url: str, timeout_s: float = 5.0) -> dict[str, int]:
    """``{"requests": n, "samples": m}`` from a tier's ``/metrics``: Infer calls by any status, samples by any
    outcome."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(url, timeout=timeout_s) as reply:
        text = reply.read().decode()
    counts = {"requests": 0, "samples": 0}
    for family in text_string_to_metric_families(text):
        key = {"splitexit_requests": "requests", "splitexit_samples": "samples"}.get(family.name)
        if key:
            counts[key] += int(sum(s.value for s in family.samples if s.name.endswith("_total")))
    return counts
