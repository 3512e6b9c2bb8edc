"""Scale-out: a tier as several replicas behind one ``--next`` target, spread round robin, surviving a replica's death.

Unit tests cover the target syntax, the server's connection-age options, the channel's service config and the
next-tier watcher over replicas; the e2e test runs 2 edge and 2 cloud replicas and SIGKILLs one of each mid-stream.
"""
from __future__ import annotations

import argparse
import itertools
import json
import threading
import time

import pytest

from common.cli import target, tier_counts
from common.serving.client import channel_options, service_config
from common.serving.health import NOT_SERVING, SERVING, UNREACHABLE, NextTierWatcher
from common.serving.options import server_options


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:50051", "127.0.0.1:50051"),
    ("edge.local:50051", "edge.local:50051"),
    ("127.0.0.2:50051,127.0.0.3:50051", "ipv4:127.0.0.2:50051,127.0.0.3:50051"),
    ("[::1]:1,[::1]:2", "ipv6:[::1]:1,[::1]:2"),
    ("ipv4:10.0.0.1:1,10.0.0.2:1", "ipv4:10.0.0.1:1,10.0.0.2:1"),
    ("dns:///splitexit-cloud.ns.svc.cluster.local:50051", "dns:///splitexit-cloud.ns.svc.cluster.local:50051"),
])
def test_next_accepts_grpc_targets(value, expected):
    assert target(value) == expected


@pytest.mark.parametrize("value", ["edge", "edge:", "a:1,b:2", "127.0.0.1:1,[::1]:2", "ipv4:[::1]:1", "ipv6:1.2.3.4:5",
                                   "dns:///cloud", "dns:cloud", "127.0.0.1:70000", "127.0.0.1:1,", ""])
def test_bad_targets_get_one_readable_line(value):
    with pytest.raises(argparse.ArgumentTypeError) as e:
        target(value)
    assert "\n" not in str(e.value) and repr(value) in str(e.value)


def test_tier_counts():
    assert tier_counts("edge=2,cloud=3") == {"edge": 2, "cloud": 3}
    for bad in ("edge", "edge=0", "edge=2,edge=3", "=2", "edge=x"):
        with pytest.raises(argparse.ArgumentTypeError):
            tier_counts(bad)


def test_servers_close_old_connections_so_callers_re_resolve():
    options = dict(server_options(1 << 20, 30.0, 10.0))
    assert options["grpc.max_connection_age_ms"] == 30_000
    assert options["grpc.max_connection_age_grace_ms"] == 10_000
    assert "grpc.max_connection_age_ms" not in dict(server_options(1 << 20))


def test_channels_balance_round_robin_with_health_checks_and_keep_retries():
    config = json.loads(dict(channel_options())["grpc.service_config"])
    assert config == service_config()
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"]["serviceName"]
    assert config["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


def test_next_tier_is_serving_while_any_replica_is(monkeypatch):
    watcher = NextTierWatcher.__new__(NextTierWatcher)
    watcher.probes = 3
    for replies, expected in [([NOT_SERVING, SERVING], SERVING), ([NOT_SERVING] * 3, NOT_SERVING),
                              ([UNREACHABLE, NOT_SERVING, UNREACHABLE], NOT_SERVING), ([UNREACHABLE] * 3, UNREACHABLE),
                              ([UNREACHABLE, SERVING], SERVING)]:
        answers = iter(replies)
        monkeypatch.setattr(watcher, "check_once", lambda: next(answers))
        assert watcher.check() == expected


# -- e2e: 2 edge + 2 cloud replicas, one of each SIGKILLed mid-stream and restarted ---------------------------------

THREADS, MIN_REQUESTS = 4, 2000
KILL_AFTER, RESTART_AFTER = 500, 1200  # requests sent
SURVIVORS_WITHIN_S, TRAFFIC_AGAIN_WITHIN_S = 2.0, 5.0
TIMEOUT = 120


def _shares(counts: dict[str, dict[str, int]]) -> list[float]:
    total = sum(c["requests"] for c in counts.values())
    return [c["requests"] / total for c in counts.values()]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_replicas_share_load_and_survive_a_killed_replica(tiny_bundle, test_slice):
    from common.emulation.deployment import LocalDeployment
    from common.model.gates import ConstantGate
    from common.serving.client import NextTierClient
    from common.wire.batch import Batch

    # Early gates never accept: every sample crosses every tier, so a dead replica is felt by every request.
    gates = {"device": ConstantGate(False), "edge": ConstantGate(False)}
    flags = ["--metrics-port", "0", "--max-connection-age", "1.5", "--max-connection-age-grace", "5"]
    dep = LocalDeployment(tiny_bundle, gates=gates, extra_args={t: flags for t in ("device", "edge", "cloud")},
                          replicas={"edge": 2, "cloud": 2}, startup_timeout_s=TIMEOUT)
    with dep:
        assert [len(a) for a in dep.replica_addresses.values()] == [1, 2, 2]
        client = NextTierClient(dep.device_address, timeout_s=60)
        model_id = client.describe().model_id
        ids, lock, stop = itertools.count(), threading.Lock(), threading.Event()
        records: list[tuple[float, list[int], object]] = []  # (sent at, sample ids, answer)
        errors: list[BaseException] = []

        def stream(worker: int) -> None:
            try:
                for k in itertools.count():
                    if stop.is_set():
                        return
                    with lock:
                        sample_ids = [next(ids) for _ in range(1 + (k + worker) % 4)]
                    x = test_slice.images[[i % len(test_slice.images) for i in sample_ids]]
                    sent_at = time.monotonic()
                    answer = client(Batch(f"scale-{sample_ids[0]}", model_id, sample_ids, x)).answer
                    with lock:
                        records.append((sent_at, sample_ids, answer))
            except BaseException as e:  # reported by the test
                errors.append(e)

        def wait_for(condition, timeout_s: float, what: str) -> float:
            deadline = time.monotonic() + timeout_s
            while not condition():
                assert not errors, errors[0]
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                time.sleep(0.02)
            return time.monotonic()

        workers = [threading.Thread(target=stream, args=(w,)) for w in range(THREADS)]
        for w in workers:
            w.start()
        try:
            wait_for(lambda: len(records) >= KILL_AFTER, TIMEOUT, f"{KILL_AFTER} requests")
            before = dep.replica_counts()
            killed_at = time.monotonic()
            dep.kill("edge", replica=0)
            dep.kill("cloud", replica=0)
            wait_for(lambda: len(records) >= RESTART_AFTER and time.monotonic() > killed_at + 3, TIMEOUT,
                     "requests through the survivors")
            restarted = [dep.restart("cloud", replica=0).address, dep.restart("edge", replica=0).address]
            up_at = time.monotonic()

            def restarted_serve() -> bool:
                counts = dep.replica_counts()
                return all(counts[t][a]["requests"] > 0 for t, a in zip(("cloud", "edge"), restarted))

            traffic_at = wait_for(restarted_serve, 30, "traffic to the restarted replicas")
            wait_for(lambda: len(records) >= MIN_REQUESTS, TIMEOUT, f"{MIN_REQUESTS} requests")
        finally:
            stop.set()
            for w in workers:
                w.join(timeout=60)
            client.close()
        assert not errors, errors[0]

    sent = next(ids)
    answered: dict[int, list] = {}
    for _, sample_ids, answer in records:
        assert sorted(p.sample_id for p in answer.predictions) == sorted(sample_ids)
        for p in answer.predictions:
            answered.setdefault(p.sample_id, []).append(p)
    assert len(records) >= MIN_REQUESTS
    assert sorted(answered) == list(range(sent))  # none lost
    assert all(len(a) == 1 for a in answered.values())  # none duplicated
    degraded = [(t, p) for t, _, a in records for p in a.predictions if p.degraded]
    late = [p for t, p in degraded if t > killed_at + SURVIVORS_WITHIN_S]
    assert not late, f"{len(late)} degraded answers to requests sent > {SURVIVORS_WITHIN_S} s after the kill"
    assert all(p.exit_tier == "cloud" for _, _, a in records for p in a.predictions if not p.degraded)
    edge_shares, cloud_shares = _shares(before["edge"]), _shares(before["cloud"])
    print(f"\n{len(records)} requests, {sent} samples; shares before the kill: edge {edge_shares}, cloud "
          f"{cloud_shares}; {len(degraded)} degraded answers; restarted replicas served again "
          f"{traffic_at - up_at:.2f} s after reporting SERVING")
    assert all(0.35 <= s <= 0.65 for s in edge_shares + cloud_shares), (edge_shares, cloud_shares)
    assert traffic_at - up_at < TRAFFIC_AGAIN_WITHIN_S
