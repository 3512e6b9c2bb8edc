"""A tier dies (SIGKILL) in the middle of a stream and comes back: every request is answered exactly once.

Three real tier processes of the tiny bundle; the early gates never accept, so every sample travels to the cloud and
a dead tier is felt by every request. One sample per request keeps the stream long (≥ 2,000 requests) yet quick.
Requests alternate between the streamed call (every reply's predictions counted as they arrive, so a sample answered
in two replies would show) and the unary one; the tiers call each other by the streamed call throughout.
"""
from __future__ import annotations

import json
import threading
import time

import pytest

from common.model.gates import ConstantGate
from common.serving.client import NextTierClient
from common.wire.batch import Answer, Batch
from common.emulation.deployment import LocalDeployment

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # every test here starts tier processes

REQUESTS = 2000
KILL_AT, RESTART_AT = 400, 800
RECOVERY_S = 5.0
TIMEOUT = 60


@pytest.fixture(scope="module")
def deployment(tiny_bundle):
    gates = {"device": ConstantGate(False), "edge": ConstantGate(False)}
    flags = ["--log-format", "json", "--metrics-port", "0"]
    extra = {t: flags for t in ("device", "edge", "cloud")}
    with LocalDeployment(tiny_bundle, gates=gates, extra_args=extra, startup_timeout_s=TIMEOUT) as dep:
        yield dep


def _stream_with_fault(dep: LocalDeployment, images, tier: str) -> dict:
    """Stream ≥ REQUESTS one-sample requests from a thread; SIGKILL ``tier`` after KILL_AT answers, restart it after
    RESTART_AT, and keep streaming until normal answers are back. Returns what was sent, answered and when.

    Kill and restart happen on this (the main) thread: tiers die with the thread that started them (PDEATHSIG).
    """
    client = NextTierClient(dep.device_address, timeout_s=10)
    info = client.describe()
    answers: dict[int, list] = {}
    state = {"sent": 0, "up_at": None, "normal_again": None, "error": None}
    tail = 100  # requests to send after the first normal answer, so the end of the stream shows normal service

    def stream() -> None:
        t_end = time.monotonic() + 120
        i, stop_at = 0, REQUESTS
        try:
            while i < stop_at or (state["normal_again"] is None and time.monotonic() < t_end):
                x = images[i % len(images)].unsqueeze(0)
                b = Batch(f"fault-{i}", info.model_id, [i], x)
                if i % 2:
                    parts = [client(b).answer]
                else:
                    parts = [f.answer for f in client.stream(b)]
                preds = [p for part in parts for p in part.predictions]
                reply = Answer(b.request_id, preds)
                for p in preds:
                    answers.setdefault(p.sample_id, []).append(p)
                if state["up_at"] is not None and state["normal_again"] is None and not reply.predictions[0].degraded:
                    state["normal_again"] = time.monotonic()
                    stop_at = max(REQUESTS, i + tail)
                i += 1
                state["sent"] = i
        except Exception as e:  # reported by the test
            state["error"] = e

    streamer = threading.Thread(target=stream)
    streamer.start()
    try:
        for at, action in ((KILL_AT, lambda: dep.kill(tier)), (RESTART_AT, lambda: dep.restart(tier))):
            while state["sent"] < at and streamer.is_alive():
                time.sleep(0.005)
            action()
        state["up_at"] = time.monotonic()
    finally:
        streamer.join(timeout=180)
        client.close()
    assert state["error"] is None, state["error"]
    return {**state, "answers": answers}


@pytest.mark.parametrize("tier, degraded_at", [("cloud", "edge"), ("edge", "device")])
def test_a_killed_tier_loses_no_request_and_normal_answers_resume(deployment, test_slice, tier, degraded_at):
    run = _stream_with_fault(deployment, test_slice.images, tier)
    answers = run["answers"]
    assert run["sent"] >= REQUESTS
    assert sorted(answers) == list(range(run["sent"]))  # none lost
    assert all(len(a) == 1 for a in answers.values())  # none duplicated
    preds = [answers[i][0] for i in range(run["sent"])]
    degraded = [p for p in preds if p.degraded]
    assert degraded, "the dead tier was never noticed"
    assert {p.exit_tier for p in degraded} == {degraded_at}  # the tier before the dead one answered for it
    assert all(p.exit_tier == "cloud" for p in preds[:KILL_AT])  # normal before the fault
    assert not any(p.degraded for p in preds[-100:])  # and normal at the end
    assert run["up_at"] is not None and run["normal_again"] is not None
    print(f"{tier} killed: {run['sent']} requests, {len(degraded)} degraded at the {degraded_at}, normal answers "
          f"{run['normal_again'] - run['up_at']:.2f} s after the restarted {tier} reported SERVING")
    assert run["normal_again"] - run["up_at"] < RECOVERY_S
    # The tier that answered for the dead one logged it, one JSON line per request, with the request id.
    log_path = next(p.log_path for p in deployment.processes if p.tier == degraded_at)
    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert any(e.get("degraded") and e.get("request_id", "").startswith("fault-") for e in entries)
    assert any("metrics on http://" in e["message"] for e in entries)
