"""Simulated Bradley-Terry labeler, the KL-regularised optimum (SNIS) and best-of-n."""
import itertools
import math

import numpy as np
import pytest

from prefalign.lab.frontier import (FrontierPoint, best_of_n, best_of_n_kl, gain_share, optimum_at_kl,
                                    optimum_frontier, proxy_optimum)
from prefalign.lab.labeler import bayes_optimal_accuracy, label_pairs, preference_probability


def _score(texts):
    """Test reward: the number written after '|' in "prompt|0.7" (a trailing a/b tells sides apart)."""
    return np.array([float(t.split("|")[1].rstrip("ab")) for t in texts])


def test_empirical_preference_frequency_matches_sigma():
    n = 20_000
    for r1, r2, tau in [(0.7, 0.5, 0.1), (0.4, 0.6, 0.5), (0.5, 0.5, 0.2)]:
        rows = label_pairs(["x|"] * n, [f"{r1}a"] * n, [f"{r2}b"] * n, tau=tau, seed=1, score=_score)
        freq = np.mean([row["chosen"] == f"{r1}a" for row in rows])
        p = 1 / (1 + math.exp(-(r1 - r2) / tau))
        se = math.sqrt(p * (1 - p) / n)
        assert abs(freq - p) < 4 * se + 1e-12, (r1, r2, tau, freq, p)


def test_p_true_is_probability_of_recorded_preference():
    rows = label_pairs(["x|"] * 200, ["0.9"] * 200, ["0.1"] * 200, tau=0.4, seed=0, score=_score)
    p = 1 / (1 + math.exp(-0.8 / 0.4))
    for row in rows:
        expected = p if row["chosen"] == "0.9" else 1 - p
        assert row["p_true"] == pytest.approx(expected, abs=1e-12)
        assert row["gold_chosen"] == float(row["chosen"])


def test_tau_to_zero_gives_deterministic_labels():
    rng = np.random.default_rng(0)
    a, b = rng.random(500), rng.random(500)
    for tau in (0.0, 1e-9):
        rows = label_pairs(["x|"] * 500, [str(float(v)) for v in a], [str(float(v)) for v in b], tau=tau, seed=5, score=_score)
        assert all(row["gold_chosen"] >= row["gold_rejected"] and row["p_true"] == 1.0 for row in rows)
    assert preference_probability(np.array([0.3]), np.array([0.3]), 0.0)[0] == 0.5


def test_bayes_optimal_accuracy_hand_example():
    # p = [sigma(1), sigma(-1), 0.5]; max(p, 1-p) = [0.7310586, 0.7310586, 0.5]; mean = 0.6540391.
    acc = bayes_optimal_accuracy(np.array([1.0, 0.0, 0.5]), np.array([0.0, 1.0, 0.5]), tau=1.0)
    assert acc == pytest.approx((2 / (1 + math.exp(-1)) + 0.5) / 3, abs=1e-12)
    assert acc == pytest.approx(0.6540390524, abs=1e-9)


def test_snis_recovers_tilted_categorical_exactly():
    # Samples enumerate the support with counts proportional to pi_SFT, so the importance
    # weights of each outcome sum to pi*(y) exactly, and N w_i = pi*(y) / pi(y).
    pi = [np.array([5, 3, 2]) / 10, np.array([1, 1, 2, 4]) / 8]
    r = [np.array([0.1, 0.9, 0.5]), np.array([0.0, 0.2, 0.7, 0.4])]
    counts = [np.array([5, 3, 2]) * 4, np.array([1, 1, 2, 4]) * 5]         # N = 40 per prompt
    rewards = np.stack([np.repeat(ri, ci) for ri, ci in zip(r, counts)])   # (2, 40)
    for beta in (0.05, 0.3, 2.0):
        exp_r, exp_kl = [], []
        for p, ri in zip(pi, r):
            q = p * np.exp(ri / beta)
            q /= q.sum()
            exp_r.append((q * ri).sum())
            exp_kl.append((q * np.log(q / p)).sum())
        (point,) = optimum_frontier(rewards, [beta])
        assert point.mean_reward == pytest.approx(np.mean(exp_r), abs=1e-12)
        assert point.mean_kl == pytest.approx(np.mean(exp_kl), abs=1e-12)


def test_frontier_monotone_in_beta_and_kl_capped_at_log_n():
    rewards = np.random.default_rng(0).random((16, 64))
    betas = [1000.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.001]
    pts = optimum_frontier(rewards, betas)
    assert pts[0].mean_kl == pytest.approx(0.0, abs=1e-3) and pts[0].mean_reward == pytest.approx(rewards.mean(), abs=2e-3)
    for hi, lo in zip(pts, pts[1:]):    # smaller beta: more reward, more KL
        assert lo.mean_reward > hi.mean_reward and lo.mean_kl > hi.mean_kl
    assert pts[-1].mean_kl <= math.log(64) + 1e-9
    assert pts[-1].mean_reward == pytest.approx(rewards.max(axis=1).mean(), abs=1e-3)


def test_best_of_n_matches_enumeration_of_subsets():
    rng = np.random.default_rng(1)
    gold, proxy = rng.random((3, 7)), rng.random((3, 7))
    for n in (1, 3, 7):
        brute = np.mean([[g[list(s)][np.argmax(p[list(s)])] for s in itertools.combinations(range(7), n)]
                         for g, p in zip(gold, proxy)])
        value, kl = best_of_n(gold, n, proxy=proxy)
        assert value == pytest.approx(brute, abs=1e-12)
        assert kl == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-15)
    assert best_of_n(gold, 1)[0] == pytest.approx(gold.mean())
    assert best_of_n(gold, 7)[0] == pytest.approx(gold.max(axis=1).mean())


def test_best_of_n_kl_values():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    assert best_of_n_kl(16) == pytest.approx(2.772588722 - 0.9375, abs=1e-9)


def test_gain_share_hand_example():
    frontier = [FrontierPoint(1.0, 0.5, 0.0), FrontierPoint(0.1, 0.8, 2.0), FrontierPoint(0.3, 0.7, 1.0)]
    assert optimum_at_kl(frontier, 1.5) == pytest.approx(0.75)
    # (0.65 - 0.5) / (0.75 - 0.5) = 0.6
    assert gain_share(0.65, 1.5, frontier, sft_reward=0.5) == pytest.approx(0.6)
    assert gain_share(0.8, 2.0, frontier, sft_reward=0.5) == pytest.approx(1.0)
    assert math.isnan(gain_share(0.5, 0.0, frontier, sft_reward=0.5))


def test_proxy_optimum_fixed_values():
    """One prompt, two SFT samples, beta = 1, proxy (0, ln 3): w_bar = (1/4, 3/4), so E[r*] = 0.2/4 + 0.6 * 3/4 = 0.5,
    E[proxy] = 3/4 ln 3, KL = sum w_bar ln(2 w_bar) = 1/4 ln(1/2) + 3/4 ln(3/2), ESS = 1 / (1/16 + 9/16) = 1.6."""
    (point,) = proxy_optimum(np.array([[0.2, 0.6]]), np.array([[0.0, math.log(3)]]), [1.0], min_ess=1.5)
    assert point.gold_reward == pytest.approx(0.5, abs=1e-12)
    assert point.proxy_reward == pytest.approx(0.75 * math.log(3), abs=1e-12)
    assert point.mean_kl == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-12)
    assert point.ess_hmean == pytest.approx(1.6, abs=1e-12) and point.trusted
    (point,) = proxy_optimum(np.array([[0.2, 0.6]]), np.array([[0.0, math.log(3)]]), [1.0], min_ess=2.0)
    assert not point.trusted


def test_proxy_optimum_is_the_frontier_of_its_proxy():
    """Tilting by the proxy gives optimum_frontier(proxy)'s KL, ESS and reward; with proxy = gold, its gold is the
    frontier's; a proxy unrelated to gold gets pi_SFT's gold on average, at any KL."""
    rng = np.random.default_rng(3)
    gold, proxy = rng.random((8, 50)), rng.normal(size=(8, 50))
    betas = [3.0, 1.0, 0.3, 0.1]
    for tilt, point in zip(proxy_optimum(gold, proxy, betas), optimum_frontier(proxy, betas)):
        assert tilt.mean_kl == pytest.approx(point.mean_kl, abs=1e-12)
        assert tilt.ess_hmean == pytest.approx(point.ess_hmean, abs=1e-9)
        assert tilt.proxy_reward == pytest.approx(point.mean_reward, abs=1e-12)
    for tilt, point in zip(proxy_optimum(gold, gold, betas), optimum_frontier(gold, betas)):
        assert tilt.gold_reward == pytest.approx(point.mean_reward, abs=1e-12)
    noise = rng.normal(size=(400, 400))
    gold = rng.random((400, 400))
    (point,) = proxy_optimum(gold, noise, [0.5])
    assert point.mean_kl > 0.5 and point.gold_reward == pytest.approx(gold.mean(), abs=0.01)
