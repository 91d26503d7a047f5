"""Chunked head log-probs (ops_chunked) equal the full-logits path, in values and gradients.

The full path is log_softmax(lm_head(h).float() / temperature), written out here.
"""
import pytest
import torch
import torch.nn.functional as F

from prefalign.ops import entropy_from_logits, token_logps
from prefalign.ops_chunked import chunked_token_logps

# bf16 keeps 8 significant bits (eps 2^-8 = 0.0039). Both paths round the same bf16 logits, so values
# agree to float32 rounding; the weight gradient is summed chunk by chunk (one bf16 rounding per chunk
# instead of one for the whole sum), so it agrees to about one bf16 ulp of its largest entry.
BF16_GRAD_ATOL = 2 ** -7


def full_path(h, weight, bias, targets, temperature):
    z = F.linear(h, weight, bias).float() / temperature  # (N, V)
    return token_logps(z[None], targets[None])[0], entropy_from_logits(z[None])[0], z.argmax(-1)


def op_inputs(N=37, H=16, V=101, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).requires_grad_()
    weight = (0.5 * torch.randn(V, H, generator=g)).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    return h, weight, b, torch.randint(0, V, (N,), generator=g), torch.randn(N, generator=g), torch.randn(N, generator=g)


def grads_of(logps, entropy, params, g_lp, g_ent):
    return torch.autograd.grad((logps * g_lp).sum() + (entropy * g_ent).sum(), params)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_tokens", [5, None])  # 5 does not divide N = 37; None: one chunk
@pytest.mark.parametrize("bias", [True, False])
def test_op_equals_full_logits_fp32(temperature, chunk_tokens, bias):
    h, weight, b, y, g_lp, g_ent = op_inputs(bias=bias)
    params = [p for p in (h, weight, b) if p is not None]
    lp, ent, top = full_path(h, weight, b, y, temperature)
    out = chunked_token_logps(h, weight, b, y, temperature=temperature, chunk_tokens=chunk_tokens,
                              with_entropy=True, with_argmax=True)
    torch.testing.assert_close(out.logps, lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.entropy, ent, rtol=0, atol=1e-5)
    assert torch.equal(out.argmax, top)
    for a, c in zip(grads_of(lp, ent, params, g_lp, g_ent), grads_of(out.logps, out.entropy, params, g_lp, g_ent)):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)
    # Log-probs alone (no entropy asked for): the same values and gradients.
    only = chunked_token_logps(h, weight, b, y, temperature=temperature, chunk_tokens=chunk_tokens)
    assert only.entropy is None and only.argmax is None
    lp = full_path(h, weight, b, y, temperature)[0]
    for a, c in zip(torch.autograd.grad((lp * g_lp).sum(), params), torch.autograd.grad((only.logps * g_lp).sum(), params)):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


def test_op_equals_full_logits_bf16_autocast():
    h, weight, b, y, g_lp, g_ent = op_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, ent, top = full_path(h, weight, b, y, 0.7)
        ref = grads_of(lp, ent, [h, weight, b], g_lp, g_ent)
        out = chunked_token_logps(h, weight, b, y, temperature=0.7, chunk_tokens=8, with_entropy=True,
                                  with_argmax=True)
        got = grads_of(out.logps, out.entropy, [h, weight, b], g_lp, g_ent)
    torch.testing.assert_close(out.logps, lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.entropy, ent, rtol=0, atol=1e-5)
    assert torch.equal(out.argmax, top)
    for a, c in zip(ref, got):
        torch.testing.assert_close(c, a, rtol=0, atol=BF16_GRAD_ATOL * float(a.abs().max()))
    fp32 = grads_of(*full_path(h, weight, b, y, 0.7)[:2], [h, weight, b], g_lp, g_ent)
    for a, c, exact in zip(ref, got, fp32):  # and no further from the float32 gradients than the full path
        assert (c - exact).norm() <= 1.5 * (a - exact).norm() + 1e-6


def test_op_ignores_negative_targets():
    h, weight, b, y, g_lp, _ = op_inputs()
    y = y.clone()
    y[::3] = -100
    out = chunked_token_logps(h, weight, b, y, chunk_tokens=4)
    assert bool((out.logps[::3] == 0).all())
    grad_h, = torch.autograd.grad((out.logps * g_lp).sum(), [h])
    assert bool((grad_h[::3] == 0).all())
    lp = full_path(h, weight, b, y.clamp(min=0), 1.0)[0]
    torch.testing.assert_close(out.logps[y >= 0], lp[y >= 0], rtol=0, atol=1e-5)
