"""Local multi-process deployment: every tier of a bundle as its own OS process on loopback, started and stopped.

Each tier binds port 0 and writes the address it got to a ready file; tiers start last-to-first (each needs its next
tier's address), and the deployment is ready once every one reports SERVING on the gRPC health service. Stopping
sends SIGTERM with a grace period, then SIGKILL. Tier processes ask the kernel to send them SIGTERM should the
launching process die (Linux), so none is left orphaned.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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
    # Optional hook (tier, next tier's address) -> address the tier should send to, e.g. a measuring proxy.
    link: Callable[[str, str], str] | None = None
    security: Security | None = None  # how to reach the tiers' health service when they speak TLS
    startup_timeout_s: float = 120.0
    grace_s: float = 5.0
    processes: list[TierProcess] = field(default_factory=list)

    @property
    def addresses(self) -> dict[str, str]:
        return {p.tier: p.address for p in self.processes}

    @property
    def device_address(self) -> str:
        return self.addresses[self.tiers[0]]

    def __post_init__(self) -> None:
        self.folders = find_tier_folders(self.bundle)
        self.tiers = [read_manifest(f).tier for f in self.folders]
        unknown = set(self.gates) - set(self.tiers)
        if unknown:
            raise SplitExitError(f"gate overrides name unknown tiers {sorted(unknown)}; tiers are {self.tiers}")

    def __enter__(self) -> "LocalDeployment":
        self._tmp = tempfile.TemporaryDirectory(prefix="splitexit-launch-")
        log_dir = Path(self.log_dir or self._tmp.name)
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            next_address = None
            for tier, folder in reversed(list(zip(self.tiers, self.folders))):
                proc = self._start(tier, folder, next_address, log_dir)
                next_address = proc.address
            for proc in self.processes:
                wait_for_serving(proc.address, self.startup_timeout_s, self.security)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self, tier: str, folder: Path, next_address: str | None, log_dir: Path, port: int = 0) -> TierProcess:
        ready = Path(self._tmp.name) / f"{tier}.addr"
        ready.unlink(missing_ok=True)
        if next_address and self.link and port == 0:  # a restart (port given) reuses the address it was told
            next_address = self.link(tier, next_address)
        self._launch = {**getattr(self, "_launch", {}), tier: (folder, next_address, log_dir)}
        cmd = [sys.executable, "-m", tier, "--bundle", str(folder), "--listen", f"{self.host}:{port}",
               "--ready-file", str(ready), "--grace", str(self.grace_s)]
        if next_address:
            cmd += ["--next", next_address]
        if self.policy:
            cmd += ["--policy", self.policy]
        if tier in self.gates:
            cmd += ["--gate", format_gate(self.gates[tier])]
        cmd += self.extra_args.get(tier, [])
        log_path = log_dir / f"{tier}.log"
        with open(log_path, "ab") as log:
            # The tier asks the kernel to SIGTERM it when we die (see common.serving.tier.die_with_parent).
            env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
            popen = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env)
        proc = TierProcess(tier, popen, log_path)
        self.processes.append(proc)
        deadline = time.monotonic() + self.startup_timeout_s
        while not ready.exists():
            if popen.poll() is not None:
                raise SplitExitError(f"the {tier} tier exited with code {popen.returncode}:\n{proc.log_tail()}")
            if time.monotonic() > deadline:
                raise SplitExitError(f"the {tier} tier did not start within {self.startup_timeout_s:.0f} s")
            time.sleep(0.05)
        proc.address = ready.read_text().strip()
        return proc

    def kill(self, tier: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one tier's process and reap it (fault tests); ``restart`` brings the tier back."""
        proc = next(p for p in self.processes if p.tier == tier)
        proc.process.send_signal(sig)
        proc.process.wait(timeout=self.grace_s + 30)

    def restart(self, tier: str) -> TierProcess:
        """Start ``tier`` again on the address and with the flags it had; return once it reports SERVING.

        Call it from a thread that outlives the tier: the kernel stops a tier when the *thread* that started it ends.
        """
        index = next(i for i, p in enumerate(self.processes) if p.tier == tier)
        old = self.processes.pop(index)
        if old.process.poll() is None:
            self.processes.insert(index, old)
            raise SplitExitError(f"the {tier} tier is still running")
        folder, next_address, log_dir = self._launch[tier]
        proc = self._start(tier, folder, next_address, log_dir, port=int(old.address.rpartition(":")[2]))
        self.processes.insert(index, self.processes.pop())
        wait_for_serving(proc.address, self.startup_timeout_s, self.security)
        return proc

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
