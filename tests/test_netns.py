"""Each tier on its own "host": a network namespace with its own address, reachable only over veth links.

device, edge and cloud each run in a namespace of their own; the test (the client) reaches the device over one veth
pair, the device reaches the edge over another (rate-limited by tc tbf) and the edge the cloud over a third. A second
edge replica has a namespace of its own, linked to the device and to the cloud; the device balances over both edges. There
is no loopback path between tiers, so the answers crossing real interfaces must equal the in-process ones. Needs
root and ``ip netns``; skipped with the reason otherwise. Namespaces and links are removed afterwards.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.serving.client import wait_for_serving
from common.serving.host import PARENT_PID_ENV
from tests.conftest import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # every test here starts tier processes

TIMEOUT = 60


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    subprocess.run(cmd, check=True, capture_output=True, timeout=20)


def _skip_reason() -> str | None:
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"se{os.getpid()}p"
    try:
        _ip("ip", "netns", "add", probe)
        _ip("ip", "netns", "del", probe)
    except (subprocess.CalledProcessError, OSError) as e:
        return f"this machine does not permit network namespaces: {getattr(e, 'stderr', e)!r}"
    return None


@pytest.fixture
def hosts():
    """Namespaces linked client - device - edge - cloud, and device - edge2 - cloud; yields {tier: (namespace,
    address)}, with the cloud's address as seen from edge2 under "cloud2"."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    tag = os.getpid() % 100000
    net = f"10.{200 + tag % 50}"
    names = {t: f"se{tag}{t[0]}{t[-1]}" for t in ("device", "edge", "edge2", "cloud")}
    created = []
    try:
        for ns in names.values():
            _ip("ip", "netns", "add", ns)
            created.append(ns)
            _ip("ip", "link", "set", "lo", "up", ns=ns)
        # (namespace of side A or None for ours, address A, namespace B, address B) per link
        links = [(None, f"{net}.0.1", names["device"], f"{net}.0.2"),
                 (names["device"], f"{net}.1.1", names["edge"], f"{net}.1.2"),
                 (names["edge"], f"{net}.2.1", names["cloud"], f"{net}.2.2"),
                 (names["device"], f"{net}.3.1", names["edge2"], f"{net}.3.2"),
                 (names["edge2"], f"{net}.4.1", names["cloud"], f"{net}.4.2")]
        for k, (ns_a, addr_a, ns_b, addr_b) in enumerate(links):
            a, b = f"v{tag}{k}a", f"v{tag}{k}b"
            _ip("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            for dev, ns, addr in ((a, ns_a, addr_a), (b, ns_b, addr_b)):
                if ns:
                    _ip("ip", "link", "set", dev, "netns", ns)
                _ip("ip", "addr", "add", f"{addr}/30", "dev", dev, ns=ns)
                _ip("ip", "link", "set", dev, "up", ns=ns)
        # The device's uplink is a rate-limited link (token bucket), as a constrained access network would be.
        _ip("tc", "qdisc", "add", "dev", f"v{tag}1a", "root", "tbf", "rate", "200mbit", "burst", "256kb",
            "latency", "200ms", ns=names["device"])
        yield {"device": (names["device"], f"{net}.0.2"), "edge": (names["edge"], f"{net}.1.2"),
               "edge2": (names["edge2"], f"{net}.3.2"), "cloud": (names["cloud"], f"{net}.2.2"),
               "cloud2": (names["cloud"], f"{net}.4.2")}
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", f"v{tag}0a"], capture_output=True, timeout=20)


def test_tiers_in_separate_namespaces_answer_as_on_loopback(hosts, tiny_bundle, test_slice, tmp_path):
    from device.client import run_client

    procs = []
    ports = {"device": 50051, "edge": 50052, "edge2": 50052, "cloud": 50053}
    # The device's next tier is both edge replicas (an ipv4: list); each edge reaches the cloud over its own link.
    nxt = {"device": f"{hosts['edge'][1]}:50052,{hosts['edge2'][1]}:50052",
           "edge": f"{hosts['cloud'][1]}:50053", "edge2": f"{hosts['cloud2'][1]}:50053"}
    try:
        for name in ("cloud", "edge", "edge2", "device"):
            ns, addr = hosts[name]
            tier = name.rstrip("2")
            listen = f"0.0.0.0:{ports[name]}" if name == "cloud" else f"{addr}:{ports[name]}"  # two links in
            cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", tier, "--bundle", str(tiny_bundle / tier),
                   "--listen", listen, "--grace", "2", "--log-level", "DEBUG"]
            if name in nxt:
                cmd += ["--next", nxt[name]]
            log = open(tmp_path / f"{name}.log", "wb")
            env = {**os.environ, PARENT_PID_ENV: str(os.getpid()), "PYTHONPATH": str(ROOT)}
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env))
            log.close()
        device = f"{hosts['device'][1]}:{ports['device']}"
        # The device's health is SERVING only once an edge is, and an edge's only once the cloud is; wait for both
        # edges too (from the device's namespace they are out of our reach, so their logs say when).
        wait_for_serving(device, TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while not all("health: SERVING" in (tmp_path / f"{e}.log").read_text(errors="replace")
                      for e in ("edge", "edge2")):
            assert time.monotonic() < deadline, "an edge replica did not start"
            time.sleep(0.1)
        report = run_client(device, test_slice.images, test_slice.labels, 32, tiny_bundle)
    finally:
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + 15
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    logs = {t: Path(tmp_path / f"{t}.log").read_text(errors="replace") for t in ports}
    tails = {t: text[-2000:] for t, text in logs.items()}
    assert report["prediction_mismatches"] == 0, tails
    assert report["degraded"] == 0 and report["samples"] == len(test_slice)
    assert report["exits"]["cloud"] > 0 and report["bytes"]["edge_to_cloud"] > 0
    served = {e: logs[e].count(" answered") for e in ("edge", "edge2")}
    assert all(n > 0 for n in served.values()), served  # round robin reached both edge replicas
