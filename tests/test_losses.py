"""Losses: hand-derived values, properties, loop equivalence, unbiasedness, gradcheck in float64."""
import math

import pytest
import torch

from prefalign.losses import (DPO_LOSSES, bradley_terry_loss, dpo_loss, gae, kl_estimate, ppo_policy_loss,
                              ppo_value_loss, whiten)

F64 = dict(dtype=torch.float64)


def softplus(x):  # -log sigma(x) = log(1 + e^-x), written out for the hand-derived values
    return math.log1p(math.exp(-x))


# --------------------------------------------------------------------------- Bradley-Terry

def test_bradley_terry_hand_derived():
    # r_c - r_r = 1 -> -log sigma(1) = log(1 + e^-1); with margin 1 the argument is 0 -> log 2.
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5])
    losses, metrics = bradley_terry_loss(chosen, rejected)
    torch.testing.assert_close(losses, torch.tensor([softplus(1.0), softplus(-0.5)]), rtol=1e-6, atol=0)
    assert metrics["accuracy"].item() == 0.5 and metrics["margin"].item() == pytest.approx(0.25)
    losses, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([1.0, -0.5]))
    torch.testing.assert_close(losses, torch.tensor([math.log(2), math.log(2)]), rtol=1e-6, atol=0)


def test_bradley_terry_swap_symmetry():
    # softplus(-d) - softplus(d) = -d: swapping the pair changes the loss by exactly the reward gap.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, generator=g, **F64), torch.randn(16, generator=g, **F64)
    loss_ab, m_ab = bradley_terry_loss(a, b)
    loss_ba, m_ba = bradley_terry_loss(b, a)
    torch.testing.assert_close(loss_ab - loss_ba, -(a - b), rtol=1e-10, atol=1e-12)
    assert m_ab["accuracy"].item() + m_ba["accuracy"].item() == pytest.approx(1.0)
    assert m_ab["margin"].item() == pytest.approx(-m_ba["margin"].item())
    assert not m_ab["accuracy"].requires_grad


def test_bradley_terry_gradcheck():
    g = torch.Generator().manual_seed(1)
    a, b, m = (torch.randn(5, generator=g, **F64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, m: bradley_terry_loss(a, b, m)[0], (a, b, m))


# --------------------------------------------------------------------------- DPO family

# policy_c = -1, policy_r = -3, ref_c = ref_r = -2: chosen log-ratio 1, rejected -1, so h = 2.
POLICY_C, POLICY_R, REF_C, REF_R = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))


@pytest.mark.parametrize("loss_type, beta, eps, expected", [
    ("sigmoid", 0.5, 0.0, softplus(1.0)),                                   # -log sigma(beta h = 1)
    ("sigmoid", 0.5, 0.1, 0.9 * softplus(1.0) + 0.1 * softplus(-1.0)),      # conservative DPO
    ("robust", 0.5, 0.1, (0.9 * softplus(1.0) - 0.1 * softplus(-1.0)) / 0.8),  # rDPO
    ("robust", 0.5, 0.0, softplus(1.0)),                                    # rDPO with eps = 0 is DPO
    ("hinge", 0.25, 0.0, 0.5),                                              # relu(1 - 0.25 * 2)
    ("hinge", 0.5, 0.0, 0.0),                                               # relu(1 - 0.5 * 2)
    ("ipo", 0.5, 0.0, 1.0),                                                 # (2 - 1 / (2 * 0.5))^2
    ("ipo", 0.25, 0.0, 0.0),                                                # (2 - 1 / (2 * 0.25))^2
])
def test_dpo_hand_derived(loss_type, beta, eps, expected):
    losses, chosen_rewards, rejected_rewards = dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta=beta,
                                                        loss_type=loss_type, label_smoothing=eps)
    assert losses.item() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert chosen_rewards.item() == pytest.approx(beta * 1.0) and rejected_rewards.item() == pytest.approx(-beta)


def test_dpo_target_margin_and_reference_free():
    # gamma = 0.5, beta = 0.5, h = 2: -log sigma(beta h - gamma) = -log sigma(0.5).
    losses, _, _ = dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta=0.5, target_margin=0.5)
    assert losses.item() == pytest.approx(softplus(0.5), rel=1e-6)
    # IPO with gamma: (h - gamma / beta - 1 / (2 beta))^2 = (2 - 1 - 1)^2 = 0.
    losses, _, _ = dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta=0.5, target_margin=0.5, loss_type="ipo")
    assert losses.item() == pytest.approx(0.0, abs=1e-12)
    # Reference-free: ref log-probs count as 0, h = -1 - (-3) = 2 whatever the ref tensors hold.
    ref = torch.tensor([5.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(POLICY_C, POLICY_R, ref, -ref, beta=0.5, reference_free=True)
    assert losses.item() == pytest.approx(softplus(1.0), rel=1e-6)
    assert chosen_rewards.item() == pytest.approx(-0.5) and rejected_rewards.item() == pytest.approx(-1.5)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_is_log2_when_policy_equals_reference(eps):
    # h = 0: sigmoid gives (1 - eps) log 2 + eps log 2 = log 2; robust ((1 - 2 eps) log 2) / (1 - 2 eps) = log 2.
    g = torch.Generator().manual_seed(2)
    chosen, rejected = -torch.rand(6, generator=g) * 20, -torch.rand(6, generator=g) * 20
    for loss_type in ("sigmoid", "robust"):
        losses, cr, rr = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=0.1,
                                  loss_type=loss_type, label_smoothing=eps)
        torch.testing.assert_close(losses, torch.full((6,), math.log(2)), rtol=1e-6, atol=0)
        assert cr.abs().max() == 0 and rr.abs().max() == 0


def test_ipo_minimiser_is_half_inverse_beta():
    beta = 0.2
    h = torch.linspace(0, 5, 501, **F64)  # step 0.01, contains 1 / (2 beta) = 2.5
    losses, _, _ = dpo_loss(h, torch.zeros_like(h), torch.zeros_like(h), torch.zeros_like(h), beta=beta,
                            loss_type="ipo")
    assert h[losses.argmin()].item() == pytest.approx(1 / (2 * beta), abs=1e-9)
    at = torch.tensor([2.5], **F64, requires_grad=True)
    loss, _, _ = dpo_loss(at, torch.zeros(1, **F64), torch.zeros(1, **F64), torch.zeros(1, **F64), beta=beta,
                          loss_type="ipo")
    loss.sum().backward()
    assert at.grad.item() == 0.0


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1), ("hinge", 0.0),
                                            ("ipo", 0.0)])
@pytest.mark.parametrize("reference_free, gamma", [(False, 0.0), (True, 0.3)])
def test_dpo_gradcheck(loss_type, eps, reference_free, gamma):
    g = torch.Generator().manual_seed(3)
    inputs = tuple((-torch.rand(4, generator=g, **F64) * 5).requires_grad_() for _ in range(4))

    def f(pc, pr, rc, rr):
        return dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=loss_type, label_smoothing=eps,
                        reference_free=reference_free, target_margin=gamma)[0]
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="kto"), "unknown loss_type"),
    (dict(loss_type="ipo", label_smoothing=0.1), "sigmoid and robust losses only"),
    (dict(loss_type="robust", label_smoothing=0.5), r"\[0, 0.5\)"),
    (dict(beta=0.0), "beta must be positive"),
])
def test_dpo_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, **{"beta": 0.1, **kwargs})


def test_dpo_registry_names():
    assert sorted(DPO_LOSSES) == ["hinge", "ipo", "robust", "sigmoid"]


# --------------------------------------------------------------------------- PPO

def test_ppo_policy_loss_hand_derived():
    # cliprange 0.2. Token 1: ratio 1.5, A = 1 -> max(-1.5, -1.2) = -1.2 (clipped).
    # Token 2: ratio 0.5, A = 1 -> max(-0.5, -0.8) = -0.5. Token 3: ratio 0.5, A = -1 -> max(0.5, 0.8) = 0.8 (clipped).
    # Token 4 is masked and holds a huge log-ratio that must not matter. Loss = (-1.2 - 0.5 + 0.8) / 3 = -0.3.
    old = torch.zeros(1, 4, **F64)
    logprobs = torch.tensor([[math.log(1.5), math.log(0.5), math.log(0.5), 1000.0]], **F64, requires_grad=True)
    advantages = torch.tensor([[1.0, 1.0, -1.0, 5.0]], **F64)
    mask = torch.tensor([[True, True, True, False]])
    loss, metrics = ppo_policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    assert loss.item() == pytest.approx(-0.3, rel=1e-12)
    assert metrics["clipfrac"].item() == pytest.approx(2 / 3)
    assert metrics["approxkl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 3)
    loss.backward()
    # Only token 2 is unclipped: d/dlogp of -A * ratio / 3 = -1 * 0.5 / 3; clipped and masked tokens get 0.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.5 / 3, 0.0, 0.0]], **F64), rtol=1e-12, atol=0)


def test_ppo_policy_loss_gradcheck():
    g = torch.Generator().manual_seed(4)
    logprobs = (-torch.rand(2, 5, generator=g, **F64)).requires_grad_()
    old = logprobs.detach() + 0.5 * torch.randn(2, 5, generator=g, **F64)
    advantages = torch.randn(2, 5, generator=g, **F64).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda lp, a: ppo_policy_loss(lp, old, a, mask, 0.2)[0], (logprobs, advantages))


def test_ppo_value_loss_hand_derived_and_gradcheck():
    # old = 0, c = 0.2, v = 1. Token 1: R = 0: (1)^2 vs (0.2)^2 -> 1. Token 2: R = 2: 1 vs (0.2 - 2)^2 = 3.24 -> 3.24.
    # Loss = 0.5 * (1 + 3.24) / 2 = 1.06; the clipped term is active on 1 of 2 tokens.
    values = torch.tensor([[1.0, 1.0, 7.0]], **F64)
    loss, metrics = ppo_value_loss(values, torch.zeros_like(values), torch.tensor([[0.0, 2.0, -9.0]], **F64),
                                   torch.tensor([[True, True, False]]), cliprange_value=0.2)
    assert loss.item() == pytest.approx(1.06, rel=1e-12)
    assert metrics["vf_clipfrac"].item() == 0.5
    g = torch.Generator().manual_seed(5)
    v = torch.randn(2, 4, generator=g, **F64).requires_grad_()
    old, ret = v.detach() + 0.3 * torch.randn(2, 4, generator=g, **F64), torch.randn(2, 4, generator=g, **F64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda v, r: ppo_value_loss(v, old, r, mask, 0.2)[0], (v, ret.requires_grad_()))


# --------------------------------------------------------------------------- GAE and whitening

def gae_loop(rewards, values, mask, gamma, lam):
    """Plain Python GAE over each row's real tokens; V after the last real token is 0."""
    B, T = rewards.shape
    adv, ret = torch.zeros(B, T, **F64), torch.zeros(B, T, **F64)
    for b in range(B):
        n = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            running = delta + gamma * lam * running
            adv[b, t], ret[b, t] = running, running + values[b, t].item()
    return adv, ret


def random_episodes(seed, B=4, T=7):
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(B, T, generator=g, **F64), torch.randn(B, T, generator=g, **F64)
    lengths = torch.tensor([T, 3, 1, 0])[:B]
    mask = torch.arange(T)[None] < lengths[:, None]  # right padding, one row with no tokens at all
    return rewards, values, mask


def test_gae_hand_derived():
    # gamma 0.9, lambda 0.8, r = (0, 1), V = (0.5, 0.25), V after the end = 0.
    # delta_1 = 1 - 0.25 = 0.75, delta_0 = 0.9 * 0.25 - 0.5 = -0.275; A_1 = 0.75, A_0 = -0.275 + 0.72 * 0.75 = 0.265.
    adv, ret = gae(torch.tensor([[0.0, 1.0, 3.0]], **F64), torch.tensor([[0.5, 0.25, 9.0]], **F64),
                   torch.tensor([[True, True, False]]), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.265, 0.75, 0.0]], **F64), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ret, torch.tensor([[0.765, 1.0, 0.0]], **F64), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("seed, gamma, lam", [(0, 1.0, 0.95), (1, 0.9, 0.5), (2, 0.99, 1.0), (3, 0.7, 0.0)])
def test_gae_matches_python_loop(seed, gamma, lam):
    rewards, values, mask = random_episodes(seed)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    exp_adv, exp_ret = gae_loop(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, exp_adv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ret, exp_ret, rtol=1e-10, atol=1e-12)


def test_gae_lambda_limits():
    gamma = 0.9
    rewards, values, mask = random_episodes(7)
    nxt = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
    nxt = torch.where(torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1), nxt, 0.0)
    td_error = torch.where(mask, rewards + gamma * nxt - values, 0.0)
    adv0, _ = gae(rewards, values, mask, gamma, 0.0)
    torch.testing.assert_close(adv0, td_error, rtol=1e-12, atol=1e-12)  # lambda = 0: one-step TD error
    adv1, ret1 = gae(rewards, values, mask, gamma, 1.0)
    T = rewards.shape[1]
    discounted = torch.zeros_like(rewards)
    for t in range(T):
        for k in range(t, T):
            discounted[:, t] += torch.where(mask[:, k], gamma ** (k - t) * rewards[:, k], 0.0)
    torch.testing.assert_close(adv1, torch.where(mask, discounted - values, 0.0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ret1, torch.where(mask, discounted, 0.0), rtol=1e-10, atol=1e-12)  # Monte Carlo return


def test_whiten():
    rewards, _, mask = random_episodes(8)
    x = rewards * 3 + 2
    w = whiten(x, mask)
    sel = w[mask]
    assert sel.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert sel.var(unbiased=True).item() == pytest.approx(1.0, rel=1e-6)  # 1e-8 in the denominator
    assert (w[~mask] == 0).all()
    kept = whiten(x, mask, shift_mean=False)[mask]
    assert kept.mean().item() == pytest.approx(x[mask].mean().item(), rel=1e-10)


def test_gae_and_whiten_gradcheck():
    rewards, values, mask = random_episodes(9)

    def f(r, v):
        adv, ret = gae(r, v, mask, 0.95, 0.9)
        return whiten(adv, mask), ret
    assert torch.autograd.gradcheck(f, (rewards.requires_grad_(), values.requires_grad_()))


# --------------------------------------------------------------------------- KL estimators

def test_kl_hand_derived():
    # p(x) = 1/2, q(x) = 1/4: log r = log q/p = -log 2; k1 = log 2, k2 = (log 2)^2 / 2, k3 = (1/2 - 1) + log 2.
    lp, lq = torch.tensor([[math.log(0.5)]], **F64), torch.tensor([[math.log(0.25)]], **F64)
    assert kl_estimate(lp, lq, "k1").item() == pytest.approx(math.log(2), rel=1e-12)
    assert kl_estimate(lp, lq, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2, rel=1e-12)
    assert kl_estimate(lp, lq, "k3").item() == pytest.approx(math.log(2) - 0.5, rel=1e-12)
    with pytest.raises(ValueError, match="unknown kind"):
        kl_estimate(lp, lq, "k4")


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_kl_estimators_are_unbiased(kind):
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], **F64)
    q = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2], **F64)
    exact = (p * (p / q).log()).sum().item()
    # Exact per-sample estimator values and their standard deviation under p.
    values = kl_estimate(p.log(), q.log(), kind)  # (5,): estimator at each outcome
    assert (p * values).sum().item() == pytest.approx(exact, rel=1e-12)  # unbiased in closed form
    std = ((p * (values - exact) ** 2).sum()).sqrt().item()
    n = 200_000
    g = torch.Generator().manual_seed(10)
    x = torch.multinomial(p, n, replacement=True, generator=g)
    mean = kl_estimate(p.log()[x][None], q.log()[x][None], kind).mean().item()
    # Five standard errors: a false failure has probability < 1e-6.
    assert abs(mean - exact) < 5 * std / math.sqrt(n)


def test_k3_is_non_negative_and_gradcheck():
    g = torch.Generator().manual_seed(11)
    lp, lq = torch.randn(50, generator=g, **F64) * 10, torch.randn(50, generator=g, **F64) * 10
    assert (kl_estimate(lp, lq, "k3") >= 0).all() and (kl_estimate(lp, lq, "k2") >= 0).all()
    lp, lq = lp[:6].div(10).requires_grad_(), lq[:6].div(10).requires_grad_()
    for kind in ("k1", "k2", "k3"):
        assert torch.autograd.gradcheck(lambda a, b: kl_estimate(a, b, kind), (lp, lq))
