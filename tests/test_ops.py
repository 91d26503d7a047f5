"""ops: log-probs of labels, masked reductions, segment sums; against loops and hand-derived values."""
import math

import pytest
import torch

from prefalign.ops import (entropy_from_logits, masked_mean, masked_sum, masked_var, next_token_inputs,
                           segment_sum, sequence_logps, token_logps)


def test_token_logps_hand_derived():
    # logits (0, ln 3): softmax = (1/4, 3/4), so log p(0) = ln(1/4) and log p(1) = ln(3/4).
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # (1, 2, 2)
    labels = torch.tensor([[0, 1]])
    expected = torch.tensor([[math.log(0.25), math.log(0.75)]])
    torch.testing.assert_close(token_logps(logits, labels), expected, rtol=1e-6, atol=1e-7)


def test_token_logps_matches_log_softmax_and_ignores_negative_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    labels = torch.randint(0, 11, (3, 5), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logps(logits, labels), expected, rtol=1e-5, atol=1e-6)
    labels[0, 2] = -100
    out = token_logps(logits, labels)
    assert out[0, 2] == 0 and torch.isfinite(out).all()


def test_token_logps_bf16_is_computed_in_float32():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 4, 50, generator=g) * 8).bfloat16()
    labels = torch.randint(0, 50, (2, 4), generator=g)
    out = token_logps(logits, labels)
    assert out.dtype == torch.float32
    # Same values as float32 maths on the bf16 numbers: nothing was rounded to bf16 on the way.
    expected = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None]).squeeze(-1).float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_sequence_logps_matches_python_loop():
    g = torch.Generator().manual_seed(2)
    B, T, V = 3, 6, 7
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    total, mean = sequence_logps(logits, labels, mask)
    for b in range(B):
        picked = []
        for t in range(T):
            if mask[b, t]:
                row = logits[b, t].tolist()
                log_z = math.log(sum(math.exp(v) for v in row))
                picked.append(row[labels[b, t]] - log_z)
        assert total[b].item() == pytest.approx(sum(picked), rel=1e-5)
        assert mean[b].item() == pytest.approx(sum(picked) / len(picked), rel=1e-5)


def test_sequence_logps_empty_row_is_zero():
    logits, labels = torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.long)
    total, mean = sequence_logps(logits, labels, torch.zeros(1, 3, dtype=torch.bool))
    assert total.item() == 0 and mean.item() == 0


def test_masked_reductions_against_selection():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 5, generator=g) > 0.4
    mask[:, 0] = True  # every row counts at least one element
    sel = x[mask]
    torch.testing.assert_close(masked_sum(x, mask), sel.sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(masked_mean(x, mask), sel.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(masked_var(x, mask), sel.var(unbiased=True), rtol=1e-12, atol=0)
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), sel.var(unbiased=False), rtol=1e-12, atol=0)
    for b in range(4):
        row = x[b][mask[b]]
        assert masked_mean(x, mask, dim=1)[b].item() == pytest.approx(row.mean().item(), rel=1e-12)
        assert masked_var(x, mask, dim=1, unbiased=False)[b].item() == pytest.approx(
            row.var(unbiased=False).item(), rel=1e-12, abs=1e-15)


def test_masked_reductions_ignore_non_finite_masked_values():
    x = torch.tensor([1.0, float("inf"), 3.0, float("nan")])
    mask = torch.tensor([True, False, True, False])
    assert masked_sum(x, mask).item() == 4.0
    assert masked_mean(x, mask).item() == 2.0
    # Hand-derived: values 1, 3 -> mean 2, squared deviations 1 + 1 = 2, unbiased var 2 / 1.
    assert masked_var(x, mask).item() == 2.0
    assert masked_var(x[:1], mask[:1]).item() == 0.0  # a single element: no division by zero


@pytest.mark.parametrize("shape", [(9,), (1, 9)])
def test_segment_sum_matches_loop(shape):
    values = torch.arange(9, dtype=torch.float64).reshape(shape) + 0.5
    ids = torch.tensor([0, 0, 1, 1, 1, 2, -1, -1, 2]).reshape(shape)
    out = segment_sum(values, ids, 4)
    flat_v, flat_i = values.reshape(-1).tolist(), ids.reshape(-1).tolist()
    expected = [sum(v for v, i in zip(flat_v, flat_i) if i == s) for s in range(4)]
    assert out.tolist() == expected  # segment 3 is empty: 0


def test_segment_sum_is_differentiable():
    values = torch.randn(1, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 0, 1, 1, -1, -1]])
    assert torch.autograd.gradcheck(lambda v: segment_sum(v, ids, 2), (values,))


def test_next_token_inputs_shifts_by_one():
    logits = torch.randn(2, 4, 3)
    ids = torch.arange(8).reshape(2, 4)
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    lg, labels, m = next_token_inputs(logits, ids, mask)
    assert torch.equal(lg, logits[:, :3]) and labels.tolist() == [[1, 2, 3], [5, 6, 7]]
    assert m.tolist() == [[False, True, True], [True, True, True]]


def test_entropy_from_logits():
    # Uniform over 4 tokens: H = ln 4. Logits (0, ln 3): p = (1/4, 3/4), H = -(1/4 ln 1/4 + 3/4 ln 3/4).
    uniform = torch.zeros(1, 1, 4)
    skewed = torch.tensor([[[0.0, math.log(3.0)]]])
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(4), rel=1e-6)
    assert entropy_from_logits(skewed).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel=1e-6)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 9, generator=g, dtype=torch.float64) * 3
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1), rtol=1e-10, atol=1e-12)
    half = logits.bfloat16()
    out = entropy_from_logits(half)
    p = torch.softmax(half.double(), -1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (-(p * p.log()).sum(-1)).float(), rtol=1e-5, atol=1e-5)
