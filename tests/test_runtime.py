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
