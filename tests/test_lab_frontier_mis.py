"""The frontier from a mixture of proposals (balance-heuristic importance sampling), against an
optimum that can be enumerated exactly.

The toy: two "prompts", each with a policy over the 27 sequences of 3 tokens from {0, 1, 2}. Token 2
is the positive one: r(y) = (number of 2s + 0.1 * base-3 index / 26) / 3.1, 27 distinct rewards in
[0, 1]. Per prompt, pi_SFT writes a 2 with probability 0.03 at each position (times a random
per-previous-token factor), so the best sequence has pi_SFT ~ 2.4e-5; the "trained" proposals are
far from it: "up" writes a 2 with probability 0.7, "sideways" a 1 with probability 0.97 (KL from
pi_SFT about 5.5 and 1.4 nats). pi*_beta = pi_SFT exp(r/beta)
/ Z is enumerated, giving its exact E*[r] and KL(pi* || pi_SFT).
"""
import itertools
import math

import numpy as np
import pytest

from prefalign.lab.frontier import (FrontierPoint, mixture_frontier, optimum_frontier, tilted_estimates,
                                   trust_edge_beta)

SEQS = np.array(list(itertools.product(range(3), repeat=3)))            # (27, 3)
BETAS = (0.02, 0.05, 0.1, 0.3, 1.0)                                     # exact KL 10.6, 9.6, 2.8, 0.10, 0.006


def autoregressive_logps(first: np.ndarray, transition: np.ndarray) -> np.ndarray:
    """(27,) log-probs of every sequence: first-token distribution (3,), transition rows (3, 3)."""
    logps = np.log(first)[SEQS[:, 0]]
    for t in (1, 2):
        logps = logps + np.log(transition[SEQS[:, t - 1], SEQS[:, t]])
    return logps


def toy_prompt(seed: int):
    """rewards (27,), log pi_SFT (27,), log q (27, 3) with proposals [pi_SFT, up, sideways]."""
    rewards = ((SEQS == 2).sum(1) + 0.1 * (SEQS @ np.array([9, 3, 1])) / 26) / 3.1
    rng = np.random.default_rng(seed)

    def policy(*token_probs: float) -> np.ndarray:
        first = np.array(token_probs)
        transition = first * rng.uniform(0.7, 1.3, size=(3, 3))
        return autoregressive_logps(first, transition / transition.sum(1, keepdims=True))

    sft = policy(0.485, 0.485, 0.03)
    return rewards, sft, np.stack([sft, policy(0.15, 0.15, 0.7), policy(0.02, 0.97, 0.01)], axis=1)


TOYS = [toy_prompt(0), toy_prompt(1)]


def exact_tilt(rewards, sft_logps, beta):
    """E*[r], KL(pi* || pi_SFT) and pi* (27,) by enumeration."""
    log_f = sft_logps + rewards / beta
    log_z = np.logaddexp.reduce(log_f)
    target = np.exp(log_f - log_z)
    mean = float(target @ rewards)
    return mean, mean / beta - log_z, target


def exact_point(beta):
    return np.mean([exact_tilt(r, s, beta)[:2] for r, s, _ in TOYS], axis=0)       # (reward, KL) over prompts


def asymptotic_se(beta, counts, threshold=None):
    """Delta-method standard errors of the prompt-averaged (E*[r], KL) for n_j draws from each q_j.

    Linearised, each estimate is a mean of psi(y_i) over the M pooled draws, with w_bar = pi* / q_mix:
    E*[r] - mu ~ mean(w_bar (r - mu)) and KL - KL ~ mean(w_bar ((r - mu) / beta - 1) + 1) (from
    (mu_hat - mu) / beta - (Z_hat - Z) / Z). Draws are stratified by proposal, so the variance is
    sum_j n_j Var_{q_j}(psi_j) / M^2; the prompts are independent and averaged. With a reward threshold
    t, w_bar of a draw under t is pi* / ((n_SFT / M) pi_SFT) from pi_SFT (proposal 0) and 0 from the others.
    """
    m, var_r, var_kl = sum(counts), 0.0, 0.0
    thresholds = np.broadcast_to(-np.inf if threshold is None else threshold, len(TOYS))   # one per prompt
    for (rewards, sft, proposals), t in zip(TOYS, thresholds):
        mean, _, target = exact_tilt(rewards, sft, beta)
        q = np.exp(proposals)                                                    # (27, J)
        above = rewards >= t
        for j, n in enumerate(counts):
            below = target / (counts[0] / m * q[:, 0]) if j == 0 else np.zeros(27)
            w_bar = np.where(above, target / (q @ (np.array(counts) / m)), below)
            for psi, which in ((w_bar * (rewards - mean), "r"), (w_bar * ((rewards - mean) / beta - 1) + 1, "kl")):
                var = n * (q[:, j] @ psi ** 2 - (q[:, j] @ psi) ** 2) / m ** 2
                var_r, var_kl = (var_r + var, var_kl) if which == "r" else (var_r, var_kl + var)
    return math.sqrt(var_r) / len(TOYS), math.sqrt(var_kl) / len(TOYS)


def draw_pool(counts, rng, proposal_columns=(0, 1, 2)):
    """n_j sequences from each proposal per prompt -> rewards (P, M), ref logps (P, M), logps (P, M, J)."""
    rewards, ref, logps = [], [], []
    for r, sft, proposals in TOYS:
        q = np.exp(proposals[:, proposal_columns])
        idx = np.concatenate([rng.choice(27, size=n, p=q[:, j] / q[:, j].sum()) for j, n in enumerate(counts)])
        rewards.append(r[idx]), ref.append(sft[idx]), logps.append(proposals[idx][:, proposal_columns])
    return np.array(rewards), np.array(ref), np.array(logps)


def test_the_toy_has_distinct_rewards_and_proposals_far_from_sft():
    for rewards, sft, proposals in TOYS:
        assert len(set(rewards)) == 27 and rewards.min() == 0 and rewards.max() == 1
        q = np.exp(proposals)
        assert np.allclose(q.sum(0), 1)
        kl_from_sft = (q * (proposals - sft[:, None])).sum(0)                    # KL(q_j || pi_SFT)
        assert kl_from_sft[0] == 0 and kl_from_sft[1] > 5 and kl_from_sft[2] > 1.2
        assert np.exp(sft[np.argmax(rewards)]) < 3e-5


def test_mixture_estimate_converges_to_the_exact_reward_and_kl():
    """RMSE over 16 draws at n = 100, 1,000, 10,000 per proposal: it tracks the delta-method
    standard error (1 / sqrt(n)) and every single estimate at n = 10^4 is within 4 of them.

    2 x SE bounds the RMSE for n >= 1000: the 16-draw RMSE / SE is below sqrt(chi2_16(0.999) / 16) = 1.57
    by chance alone, and the SNIS bias (order 1 / n) is a small fraction of the SE there.
    Measured (beta 0.02..1): reward RMSE 3e-7..1.3e-2 at n = 100 and 5e-8..7e-4 at n = 10^4, KL RMSE
    0.03..0.16 and 0.003..0.011 nats; harmonic-mean ESS 34..150 and 3,500..14,800.
    """
    ns, reps = (100, 1000, 10000), 16
    rmse = np.zeros((len(ns), len(BETAS), 2))
    hmean_ess = np.zeros((len(ns), len(BETAS)))
    for a, n in enumerate(ns):
        counts = [n, n, n]
        errors = []
        for rep in range(reps):
            pts = mixture_frontier(*draw_pool(counts, np.random.default_rng(1000 + rep)), counts, BETAS)
            errors.append([(p.mean_reward - exact_point(b)[0], p.mean_kl - exact_point(b)[1]) for p, b in zip(pts, BETAS)])
            hmean_ess[a] += np.array([p.ess_hmean for p in pts]) / reps
            if n == ns[-1]:
                for (err_r, err_kl), b in zip(errors[-1], BETAS):
                    se_r, se_kl = asymptotic_se(b, counts)
                    assert abs(err_r) < 4 * se_r and abs(err_kl) < 4 * se_kl, (b, err_r, se_r, err_kl, se_kl)
        rmse[a] = np.sqrt((np.array(errors) ** 2).mean(axis=0))                   # (betas, 2)
        if n >= 1000:
            for i, b in enumerate(BETAS):
                se = asymptotic_se(b, counts)
                assert rmse[a, i, 0] <= 2 * se[0] and rmse[a, i, 1] <= 2 * se[1], (n, b, rmse[a, i], se)
    assert (rmse[-1] < rmse[0] / 5).all(), rmse                  # 100x the samples: 10x smaller errors expected
    assert (rmse[-1, :, 1] < 0.02).all()                         # KL within 0.02 nats at n = 10^4
    assert (hmean_ess[-1] > 50 * hmean_ess[0]).all() and (hmean_ess[-1] > 1000).all(), hmean_ess


def test_sft_only_snis_misses_the_optimum_that_the_mixture_finds():
    """The same 30,000 samples per prompt drawn from pi_SFT alone. At beta 0.02 and 0.05 pi* sits on
    the sequences with the most 2s, which pi_SFT writes with probability ~2.4e-5 (222) to ~1e-3, so
    SNIS fails in one of two ways: it drew 222 a few times and those few samples take all the weight
    (ESS ~1.3, untrusted; 3 of these 4 draws), or it never drew 222 and understates the reward by
    0.3 with an ESS of ~64 that looks fine (1 of 4): a region no proposal visits is invisible to the
    weights (frontier docstring). Its KL can never pass log(30,000) = 10.3; the exact one at beta 0.02
    is 10.6. The mixture, with the "up" policy among its proposals, is within 4 standard errors,
    trusted and with an ESS over 1,000 on every prompt."""
    n = 10000
    for rep in range(4):
        rng = np.random.default_rng(7 + rep)
        rewards, ref, logps = draw_pool([n, n, n], rng)
        sft_rewards, _, _ = draw_pool([3 * n], rng, proposal_columns=(0,))
        mixture = mixture_frontier(rewards, ref, logps, [n, n, n], (0.02, 0.05))
        sft_only = optimum_frontier(sft_rewards, (0.02, 0.05))
        for mix, snis, beta in zip(mixture, sft_only, (0.02, 0.05)):
            exact_r, exact_kl = exact_point(beta)
            se_r, se_kl = asymptotic_se(beta, [n, n, n])
            assert abs(mix.mean_reward - exact_r) < 4 * se_r and abs(mix.mean_kl - exact_kl) < 4 * se_kl
            assert mix.trusted and mix.ess_min > 1000
            assert not snis.trusted or snis.mean_reward < exact_r - 0.1, (rep, beta, snis)
        assert sft_only[0].mean_kl <= math.log(3 * n) < exact_point(0.02)[1] - 0.3


def test_one_proposal_mixture_is_plain_snis():
    """Twin of optimum_frontier: pi_SFT as the only proposal, with its real log-probs, gives the
    same numbers as SNIS on the rewards alone (the log-probs cancel in w = pi_SFT exp(r/beta) / pi_SFT)."""
    rewards, ref, logps = draw_pool([500], np.random.default_rng(3), proposal_columns=(0,))
    mixture = mixture_frontier(rewards, ref, logps, [500], BETAS)
    snis = optimum_frontier(rewards, BETAS)
    for a, b in zip(mixture, snis):
        assert a.beta == b.beta and a.trusted == b.trusted
        np.testing.assert_allclose(a[1:6], b[1:6], rtol=1e-10, atol=1e-12)


def test_estimate_is_invariant_to_shifting_a_samples_logps_and_to_splitting_a_proposal():
    """A per-sample constant on every log-prob of that sample (how a length-dependent offset would look)
    cancels in the weights; a proposal listed twice with its count split is the same mixture; the
    order of the proposals does not matter."""
    counts = [40, 30, 20]
    rewards, ref, logps = draw_pool(counts, np.random.default_rng(5))
    base = mixture_frontier(rewards, ref, logps, counts, BETAS)
    shift = np.random.default_rng(6).normal(size=rewards.shape) * 5                  # (P, M)
    shifted = mixture_frontier(rewards, ref + shift, logps + shift[:, :, None], counts, BETAS)
    split = mixture_frontier(rewards, ref, logps[:, :, [0, 1, 1, 2]], [40, 10, 20, 20], BETAS)
    permuted = mixture_frontier(rewards, ref, logps[:, :, [2, 0, 1]], [20, 40, 30], BETAS)
    for other in (shifted, split, permuted):
        for a, b in zip(base, other):
            np.testing.assert_allclose(a[1:6], b[1:6], rtol=1e-9, atol=1e-12)


def test_ess_and_trust_hand_example():
    """One prompt, r = 0, log pi_SFT = log [1, 1, 2], one flat proposal: w = [1, 1, 2], so
    ESS = (1 + 1 + 2)^2 / (1 + 1 + 4) = 8/3; log Z = log(4/3); E*[r] = 0, so KL = -log(4/3)
    (pi_SFT here is not normalised: the formulas, not a distribution, are under test)."""
    est = tilted_estimates(np.zeros((1, 3)), np.log([[1.0, 1.0, 2.0]]), np.zeros((1, 3, 1)), [3], beta=0.5)
    assert est.ess[0] == pytest.approx(8 / 3) and est.log_z[0] == pytest.approx(math.log(4 / 3))
    assert est.kl[0] == pytest.approx(-math.log(4 / 3))
    # Two prompts with ESS 8/3 and 3: harmonic mean 1 / ((3/8 + 1/3) / 2) = 48/17.
    (point,) = mixture_frontier(np.zeros((2, 3)), np.log([[1.0, 1.0, 2.0], [1.0, 1.0, 1.0]]), np.zeros((2, 3, 1)),
                                [3], [0.5], min_ess=2.8)
    assert point.ess_min == pytest.approx(8 / 3) and point.ess_mean == pytest.approx((8 / 3 + 3) / 2)
    assert point.ess_hmean == pytest.approx(48 / 17) and point.trusted          # 2.824 >= 2.8
    (point,) = mixture_frontier(np.zeros((2, 3)), np.log([[1.0, 1.0, 2.0], [1.0, 1.0, 1.0]]), np.zeros((2, 3, 1)),
                                [3], [0.5], min_ess=2.9)
    assert not point.trusted
    assert FrontierPoint(1.0, 0.5, 0.0).trusted                # points built by hand are trusted by default


def test_the_trust_edge_is_where_the_ess_crosses_the_threshold_between_two_grid_points():
    """One prompt, two pi_SFT samples with r = 0 and 1: w = [1, a], a = exp(1 / beta), ESS = (1 + a)^2 / (1 + a^2).
    ESS = 1.5 where a^2 - 4 a + 1 = 0, a = 2 + sqrt(3): beta = 1 / log(2 + sqrt(3)) = 0.7593, between the grid's
    trusted 1 (ESS 1.648) and untrusted 0.5 (1.266)."""
    pool = (np.array([[0.0, 1.0]]), np.zeros((1, 2)), np.zeros((1, 2, 1)), [2])
    edge = trust_edge_beta(*pool, [0.1, 0.5, 1.0, 2.0], min_ess=1.5)
    assert edge == pytest.approx(1 / math.log(2 + math.sqrt(3)), rel=1e-3) and 0.5 < edge < 1.0
    (point,) = mixture_frontier(*pool, [edge], min_ess=1.5)
    assert point.trusted and point.ess_hmean == pytest.approx(1.5, rel=1e-3)
    assert not mixture_frontier(*pool, [edge / 1.002], min_ess=1.5)[0].trusted   # the edge, to rel_tol
    assert trust_edge_beta(*pool, [1.0, 2.0], min_ess=1.5) is None            # every grid point trusted
    assert trust_edge_beta(*pool, [0.1, 0.5], min_ess=1.5) is None            # none


def test_pool_shapes_and_counts_are_checked():
    rewards, ref, logps = np.zeros((2, 5)), np.zeros((2, 5)), np.zeros((2, 5, 2))
    with pytest.raises(ValueError, match="summing to the pool's 5"):
        mixture_frontier(rewards, ref, logps, [2, 2], [1.0])
    with pytest.raises(ValueError, match="positive number"):
        mixture_frontier(rewards, ref, logps, [5, 0], [1.0])
    with pytest.raises(ValueError, match="prompts, samples, proposals"):
        mixture_frontier(rewards, ref, logps[:, :4], [3, 2], [1.0])


# --------------------------------------------------------------------------- a reward threshold

def below_threshold_unscored(rewards, ref, logps, threshold):
    """The pool as the demo stores it: no log-prob for a sample under the threshold (NaN)."""
    below = rewards < np.asarray(threshold).reshape(-1, 1)
    return np.where(below, np.nan, ref), np.where(below[:, :, None], np.nan, logps)


def test_a_threshold_under_every_reward_is_the_plain_mixture_and_over_every_reward_is_sft_snis():
    counts = [40, 30, 20]
    rewards, ref, logps = draw_pool(counts, np.random.default_rng(11))
    plain = mixture_frontier(rewards, ref, logps, counts, BETAS)
    low = mixture_frontier(rewards, ref, logps, counts, BETAS, threshold=np.full(2, -1.0))
    # over every reward: the 40 pi_SFT draws alone, weighted exp(r / beta), the others weigh nothing
    ref_nan, logps_nan = below_threshold_unscored(rewards, ref, logps, np.full(2, 2.0))
    high = mixture_frontier(rewards, ref_nan, logps_nan, counts, BETAS, threshold=np.full(2, 2.0))
    snis = optimum_frontier(rewards[:, :40], BETAS)
    for a, b, c, d in zip(plain, low, high, snis):
        np.testing.assert_allclose(a[1:6], b[1:6], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(c[1:6], d[1:6], rtol=1e-10, atol=1e-12)


def test_a_threshold_keeps_z_unbiased_and_the_estimate_converges_to_the_exact_one():
    """A fixed threshold t = 0.6 (sequences with two or three 2s are above it): only the draws above it
    carry log-probs. Every weighting whose shares sum to 1 at each y is unbiased for Z, so over 400
    pools of 30 + 30 + 30 draws the mean of Z_hat per prompt is within 4 standard errors of the exact Z.
    At n = 10^4 per proposal each estimate of (E*[r], KL) is within 4 delta-method standard errors of
    the exact values, for every beta, and the errors shrink with n."""
    t = np.full(2, 0.6)
    betas = (0.05, 0.1, 0.3)
    for beta in betas:
        z_hats = []
        for rep in range(400):
            rewards, ref, logps = draw_pool([30, 30, 30], np.random.default_rng(5000 + rep))
            ref_nan, logps_nan = below_threshold_unscored(rewards, ref, logps, t)
            z_hats.append(np.exp(tilted_estimates(rewards, ref_nan, logps_nan, [30, 30, 30], beta, t).log_z))
        z_hats = np.array(z_hats)                                                  # (reps, prompts)
        exact_z = [np.exp(np.logaddexp.reduce(sft + r / beta)) for r, sft, _ in TOYS]
        se = z_hats.std(axis=0, ddof=1) / math.sqrt(len(z_hats))
        assert (np.abs(z_hats.mean(axis=0) - exact_z) < 4 * se).all(), (beta, z_hats.mean(axis=0), exact_z, se)
    errors = {}
    for n in (100, 10000):
        counts = [n, n, n]
        rewards, ref, logps = draw_pool(counts, np.random.default_rng(77))
        ref_nan, logps_nan = below_threshold_unscored(rewards, ref, logps, t)
        points = mixture_frontier(rewards, ref_nan, logps_nan, counts, betas, threshold=t)
        errors[n] = []
        for p, beta in zip(points, betas):
            exact_r, exact_kl = exact_point(beta)
            se_r, se_kl = asymptotic_se(beta, counts, threshold=0.6)
            errors[n].append((abs(p.mean_reward - exact_r), abs(p.mean_kl - exact_kl)))
            if n == 10000:
                assert errors[n][-1][0] < 4 * se_r and errors[n][-1][1] < 4 * se_kl, (beta, p, se_r, se_kl)
                assert p.trusted
    assert np.sum(errors[10000]) < np.sum(errors[100]) / 5, errors


def test_a_threshold_at_the_kth_best_sft_draw_converges_as_the_demo_uses_it():
    """The demo's threshold is an order statistic of the pooled pi_SFT draws (the 32nd best of 256): the
    estimate is then consistent, not exactly unbiased. With the 1/8 best of n pi_SFT draws scored, at
    n = 10^4 the estimates are within 4 delta-method standard errors of exact."""
    n = 10000
    counts = [8 * n, n, n]
    rewards, ref, logps = draw_pool(counts, np.random.default_rng(123))
    t = -np.sort(-rewards[:, :8 * n], axis=1)[:, n - 1]                           # the n-th best pi_SFT draw
    ref_nan, logps_nan = below_threshold_unscored(rewards, ref, logps, t)
    assert np.isnan(logps_nan[:, :8 * n]).all(axis=2).mean() > 0.75   # most pi_SFT draws unscored (ties: 27 sequences)
    for p, beta in zip(mixture_frontier(rewards, ref_nan, logps_nan, counts, (0.05, 0.1, 0.3), threshold=t),
                       (0.05, 0.1, 0.3)):
        exact_r, exact_kl = exact_point(beta)
        se_r, se_kl = asymptotic_se(beta, counts, threshold=t)
        assert abs(p.mean_reward - exact_r) < 4 * se_r and abs(p.mean_kl - exact_kl) < 4 * se_kl, (beta, p)


def test_a_sample_over_the_threshold_without_log_probs_is_refused():
    counts = [4, 3]
    rewards, ref, logps = draw_pool(counts, np.random.default_rng(2), proposal_columns=(0, 1))
    logps[0, 5, 1] = np.nan
    t = np.full(2, rewards[0, 5] - 1e-9)
    with pytest.raises(ValueError, match="at or above the threshold lack a log-prob .first: prompt 0, sample 5"):
        mixture_frontier(rewards, ref, logps, counts, [0.1], threshold=t)
