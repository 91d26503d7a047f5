"""The standard errors of the shares of the optimum's gain (lab.demo_noise): a bootstrap over prompts."""
import math

import numpy as np
import pytest

from prefalign.lab.demo_noise import PerPrompt, best_of_n_per_prompt, frontier_per_prompt, share_standard_errors
from prefalign.lab.frontier import best_of_n, gain_share, FrontierPoint, mixture_frontier


def test_with_only_the_methods_reward_varying_the_se_is_its_standard_error_over_the_gain():
    """SFT 0.5 and the optimum 0.5 + 0.1 KL on every prompt (no noise there); the method sits at KL 2
    on every prompt, so share = (mean r - 0.5) / 0.2 and SE(share) = sd(r) / sqrt(P) / 0.2. A bootstrap
    of R resamples estimates an SE with relative error about 1 / sqrt(2 R) (1.1 % at R = 4000)."""
    rng = np.random.default_rng(0)
    n_prompts = 100
    reward = 0.62 + rng.normal(0, 0.1, n_prompts)
    kls = np.array([0.0, 1.0, 4.0])
    frontier = PerPrompt(np.repeat((0.5 + 0.1 * kls)[:, None], n_prompts, 1), np.repeat(kls[:, None], n_prompts, 1))
    (se,) = share_standard_errors([PerPrompt(reward, np.full(n_prompts, 2.0))], np.full(n_prompts, 0.5), frontier,
                                  n_bootstrap=4000)
    expected = reward.std(ddof=0) / math.sqrt(n_prompts) / 0.2
    assert se == pytest.approx(expected, rel=0.05)


def test_the_bootstrap_equals_a_plain_loop_over_resamples():
    """The same resamples (same seed) through gain_share of lab.frontier, one resample at a time."""
    rng = np.random.default_rng(1)
    n_prompts, n_boot = 20, 50
    sft = rng.uniform(0.4, 0.6, n_prompts)
    f_kl = np.sort(rng.uniform(0, 5, (4, n_prompts)), axis=0)
    f_reward = 0.5 + 0.08 * f_kl + rng.normal(0, 0.02, (4, n_prompts))
    row = PerPrompt(rng.uniform(0.5, 0.8, n_prompts), rng.uniform(0.5, 3.0, n_prompts))
    (se,) = share_standard_errors([row], sft, PerPrompt(f_reward, f_kl), n_bootstrap=n_boot, seed=7)
    idx = np.random.default_rng(7).integers(0, n_prompts, size=(n_boot, n_prompts))
    shares = []
    for i in idx:
        points = [FrontierPoint(0.0, float(r[i].mean()), float(k[i].mean())) for r, k in zip(f_reward, f_kl)]
        shares.append(gain_share(row.reward[i].mean(), row.kl[i].mean(), points, sft[i].mean()))
    assert se == pytest.approx(np.std(shares, ddof=1), rel=1e-12)


def test_a_share_undefined_on_most_resamples_has_no_se():
    """The method at KL 0, where the optimum's gain is 0: the share is undefined, and so is its SE."""
    n = 10
    frontier = PerPrompt(np.array([[0.5] * n, [0.7] * n]), np.array([[0.0] * n, [2.0] * n]))
    (se,) = share_standard_errors([PerPrompt(np.full(n, 0.5), np.zeros(n))], np.full(n, 0.5), frontier)
    assert math.isnan(se)


def test_best_of_n_per_prompt_averages_to_best_of_n():
    rng = np.random.default_rng(2)
    gold, proxy = rng.uniform(size=(6, 16)), rng.normal(size=(6, 16))
    per = best_of_n_per_prompt(gold, proxy, 4)
    assert per.reward.mean() == pytest.approx(best_of_n(gold, 4, proxy=proxy)[0], abs=1e-12)
    assert (per.kl == math.log(4) - 3 / 4).all()


def test_frontier_per_prompt_averages_to_the_pools_frontier_with_a_threshold():
    """The bootstrap's per-prompt optimum is the frontier's, threshold included: a pool whose samples
    under the threshold carry no log-prob (NaN, as the demo stores them) gives finite per-prompt
    estimates whose means are mixture_frontier's points."""
    rng = np.random.default_rng(0)
    counts, betas = [6, 3, 3], (0.05, 0.3, 1.0)
    rewards = rng.uniform(size=(4, 12))
    logps = rng.normal(-10, 2, size=(4, 12, 3))
    threshold = np.sort(rewards[:, :6], axis=1)[:, 3]                  # the 3rd best of the 6 pi_SFT draws
    logps[rewards < threshold[:, None]] = np.nan
    per_prompt = frontier_per_prompt(rewards, logps[:, :, 0], logps, counts, betas, threshold)
    assert np.isfinite(per_prompt.reward).all() and np.isfinite(per_prompt.kl).all()
    for b, point in enumerate(mixture_frontier(rewards, logps[:, :, 0], logps, counts, betas, threshold=threshold)):
        assert per_prompt.reward[b].mean() == pytest.approx(point.mean_reward, abs=1e-12)
        assert per_prompt.kl[b].mean() == pytest.approx(point.mean_kl, abs=1e-12)
