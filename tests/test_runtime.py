"""TierRuntime without any network: the next tier is a plain function."""
import pytest
import torch
from torch import nn

from common.errors import DownstreamError, InvalidRequest, PreconditionFailed
from common.model.gates import ConfidenceGate, ConstantGate
from common.wire.batch import Answer, Batch, Prediction
from common.serving.runtime import Forwarded, TierRuntime, TierSpec, all_finite


class ToySegment(nn.Module):
    """Features = input + 1; logits put all mass on class 1 when the row's first value is large, else uniform."""

    def forward(self, x):
        features = x + 1
        confident = (x[:, 0] > 0).float() * 20
        logits = torch.zeros(len(x), 3)
        logits[:, 1] = confident
        return features, logits


def spec(**kw):
    base = dict(tier="device", model_id="m1", exits=(0,), input_shape=(2,), input_dtype=torch.float32,
                exit_flops=(100.0,), is_last=False, max_batch=16)
    base.update(kw)
    return TierSpec(**base)


class FakeNext:
    """Records what it is sent and answers every sample with label 2 from 'cloud'."""

    def __init__(self, drop: int = 0):
        self.calls: list[Batch] = []
        self.drop = drop

    def __call__(self, batch: Batch) -> Forwarded:
        self.calls.append(batch)
        preds = [Prediction(i, 2, 0.5, "cloud", 2) for i in batch.sample_ids[self.drop:]]
        return Forwarded(Answer(batch.request_id, preds, []), 1234)


def batch(values, ids=None, model_id="m1"):
    x = torch.tensor(values, dtype=torch.float32)
    return Batch("r1", model_id, ids if ids is not None else list(range(10, 10 + len(x))), x)


def test_exits_answer_here_and_only_the_rest_is_forwarded():
    nxt = FakeNext()
    rt = TierRuntime(spec(), ToySegment(), ConfidenceGate(0.9), nxt)
    answer = rt.process(batch([[5, 0], [-5, 0], [3, 1], [-1, 7]]), bytes_received=99)
    assert [p.sample_id for p in answer.predictions] == [10, 11, 12, 13]  # request order kept
    assert [p.exit_tier for p in answer.predictions] == ["device", "cloud", "device", "cloud"]
    assert [p.label for p in answer.predictions] == [1, 2, 1, 2]
    assert len(nxt.calls) == 1
    sent = nxt.calls[0]
    assert sent.sample_ids == [11, 13] and sent.model_id == "m1" and sent.request_id == "r1"
    assert torch.equal(sent.tensor, torch.tensor([[-4.0, 1.0], [0.0, 8.0]]))  # the features, not the input
    hop = answer.trace[0]
    assert (hop.tier, hop.samples_in, hop.samples_exited, hop.bytes_received, hop.bytes_sent, hop.flops) == (
        "device", 4, 2, 99, 1234, 400.0)


def test_nothing_forwarded_when_all_exit():
    nxt = FakeNext()
    answer = TierRuntime(spec(), ToySegment(), ConstantGate(True), nxt).process(batch([[1, 1], [-1, 1]]))
    assert nxt.calls == [] and answer.trace[0].bytes_sent == 0
    assert {p.exit_tier for p in answer.predictions} == {"device"}


def test_last_tier_answers_everything_whatever_its_gate():
    rt = TierRuntime(spec(tier="cloud", is_last=True, exits=(2,)), ToySegment(), ConstantGate(False))
    answer = rt.process(batch([[-1, 0], [-2, 0]]))
    assert [p.exit_tier for p in answer.predictions] == ["cloud", "cloud"]
    assert [p.exit_index for p in answer.predictions] == [2, 2]


def test_non_last_tier_needs_a_next_tier():
    with pytest.raises(ValueError, match="next tier"):
        TierRuntime(spec(), ToySegment(), ConstantGate(False), None)


@pytest.mark.parametrize("make, error, message", [
    (lambda: batch([[1, 1]], model_id="other"), PreconditionFailed, "model id"),
    (lambda: Batch("r", "m1", [], torch.zeros(0, 2)), InvalidRequest, "empty batch"),
    (lambda: batch([[1, 1], [2, 2]], ids=[3, 3]), InvalidRequest, "duplicate sample ids"),
    (lambda: batch([[1, 1], [2, 2]], ids=[3]), InvalidRequest, "first dimension"),
    (lambda: batch([[1, 1, 1]]), PreconditionFailed, "per-sample shape"),
    (lambda: Batch("r", "m1", [1], torch.zeros(1, 2, dtype=torch.float64)), PreconditionFailed, "float32"),
    (lambda: batch([[float("nan"), 1]]), InvalidRequest, "NaN or Inf"),
    (lambda: batch([[float("inf"), 1]]), InvalidRequest, "NaN or Inf"),
    (lambda: batch([[1, 1]] * 17), InvalidRequest, "exceeds"),
])
def test_bad_batches_are_refused_before_any_compute(make, error, message):
    nxt = FakeNext()
    with pytest.raises(error, match=message):
        TierRuntime(spec(), ToySegment(), ConstantGate(False), nxt).process(make())
    assert nxt.calls == []


def test_all_finite_is_exact_even_where_the_sum_overflows():
    big = torch.full((4, 8), 3e38)  # finite values whose float32 sum is inf: the slow path must say finite
    assert not torch.isfinite(big.sum()) and all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in ((0, 0), (3, 7), (2, 5)):
            x = torch.randn(4, 8)
            x[where] = bad
            assert not all_finite(x)
            big2 = big.clone()
            big2[where] = bad
            assert not all_finite(big2)
    mixed = torch.randn(4, 8)
    mixed[0, 0], mixed[1, 1] = float("inf"), -float("inf")  # inf - inf = NaN: still caught
    assert not all_finite(mixed)
    assert all_finite(torch.randn(3, 5)) and all_finite(torch.zeros(0, 2))
    assert all_finite(torch.full((2, 3), 6e4, dtype=torch.float16))  # the half-precision sum overflows


def test_run_validated_answers_like_process_and_forwards_the_features_themselves():
    nxt = FakeNext()
    rt = TierRuntime(spec(), ToySegment(), ConstantGate(False), nxt)
    b = batch([[5, 0], [-5, 0]])
    fast, checked = rt.run_validated(b), rt.process(b)
    assert fast.predictions == checked.predictions
    assert [(h.samples_in, h.samples_exited, h.flops) for h in fast.trace] == [(2, 0, 200.0)]
    assert torch.equal(nxt.calls[0].tensor, b.tensor + 1)  # everyone forwarded: the features, ungathered


def test_next_tier_losing_samples_is_an_error():
    rt = TierRuntime(spec(), ToySegment(), ConstantGate(False), FakeNext(drop=1))
    with pytest.raises(DownstreamError, match="answered 1 samples for 2 sent"):
        rt.process(batch([[1, 1], [2, 2]]))


class Add(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x + self.k


class SureAbove(nn.Module):
    """Logits with all mass on class 1 when the row's first feature exceeds ``cut``, else a weak class 0."""

    def __init__(self, cut):
        super().__init__()
        self.cut = cut

    def forward(self, f):
        logits = torch.zeros(len(f), 3)
        logits[:, 1] = (f[:, 0] > self.cut).float() * 20
        logits[:, 0] = 0.5
        return logits


def two_exit_segment():
    """A real two-exit ``Segment``: features + 1 then + 2; exit 0 is sure above 3, exit 1 above 4."""
    from common.model.split import Segment

    return Segment([[Add(1)], [Add(2)]], [SureAbove(3), SureAbove(4)])


def two_exit_spec(**kw):
    return spec(exits=(0, 1), exit_flops=(10.0, 20.0), send_flops=5.0, num_classes=3, **kw)


def test_a_tier_with_two_exits_runs_the_second_only_on_what_the_first_declined():
    nxt = FakeNext()
    rt = TierRuntime(two_exit_spec(history=True), two_exit_segment(), ConfidenceGate(0.9), nxt)
    # rows: 5 -> f0 6 (exit 0), 0 -> f0 1, f1 3 (declined twice), 4 -> f0 5 (exit 0), 1.5 -> f0 2.5, f1 4.5 (exit 1)
    answer = rt.process(batch([[5, 0], [0, 0], [4, 0], [1.5, 0]]))
    assert [(p.exit_tier, p.exit_index) for p in answer.predictions] == [
        ("device", 0), ("cloud", 2), ("device", 0), ("device", 1)]
    sent = nxt.calls[0]
    assert sent.sample_ids == [11] and torch.equal(sent.tensor, torch.tensor([[3.0, 3.0]]))
    assert sent.history.shape == (1, 2, 3)  # both exits' logits travel on: the next tier's gates may read them
    hop = answer.trace[0]
    assert (hop.samples_in, hop.samples_exited) == (4, 3)
    assert hop.flops == 10.0 * 4 + 20.0 * 2 + 5.0 * 1  # each sample pays the exits it reached, sent ones the send


def test_without_history_nothing_extra_is_sent():
    nxt = FakeNext()
    TierRuntime(two_exit_spec(), two_exit_segment(), ConfidenceGate(0.9), nxt).process(batch([[0, 0]]))
    assert nxt.calls[0].history is None


@pytest.mark.parametrize("history, words", [
    (None, "needs the logits of exits 0..1"),
    (torch.zeros(2, 1, 3), "shape"),
    (torch.zeros(2, 2, 3, dtype=torch.int64), "floating-point"),
    (torch.full((2, 2, 3), float("nan")), "NaN"),
])
def test_a_tier_that_reads_earlier_exits_refuses_a_request_without_them(history, words):
    rt = TierRuntime(spec(tier="edge", exits=(2,), num_classes=3, history=True), ToySegment(), ConfidenceGate(0.9),
                     FakeNext())
    b = batch([[5, 0], [1, 0]])
    b.history = history
    with pytest.raises(InvalidRequest, match=words):
        rt.process(b)


def test_a_gate_that_reads_earlier_exits_needs_them_on_the_wire():
    from common.errors import ConfigError

    class Reader(ConfidenceGate):
        needs_history = True
        kind = "reader"

    with pytest.raises(ConfigError, match="exported without them"):
        TierRuntime(spec(tier="edge", exits=(1,)), ToySegment(), Reader(0.5), FakeNext())
