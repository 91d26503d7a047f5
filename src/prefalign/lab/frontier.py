"""The yardsticks of the reward-vs-KL plot: the KL-regularised optimum and best-of-n.

The optimum of  max_pi E_pi[r*] - beta KL(pi || pi_SFT)  is (DPO paper eq. 4)

    pi*_beta(y | x) = pi_SFT(y | x) exp(r*(x, y) / beta) / Z(x).

We estimate it per prompt by self-normalised importance sampling from a mixture of proposals
q_1..q_J (pi_SFT and the trained policies), n_j samples from each, M = sum_j n_j, every sample
scored under every proposal: the balance heuristic of multiple importance sampling (Veach & Guibas
1995), which weighs a sample by the mixture that could have drawn it, whichever q_j did:

    w(y) = pi_SFT(y) exp(r(y) / beta) / q_mix(y),      q_mix(y) = sum_j (n_j / M) q_j(y)
    E*[r] ~ sum_i w_i r_i / sum_i w_i,    Z ~ (1 / M) sum_i w_i,
    KL(pi* || pi_SFT) = E*[log pi* - log pi_SFT] = E*[r] / beta - log Z.

With pi_SFT as the only proposal this is plain SNIS (w_i = exp(r_i / beta)), whose KL can never
exceed log M: one sample taking all the weight.

A reward threshold t(x) saves most of the scoring (``threshold``): every weighting of the samples
whose shares sum to 1 over the proposals at every y is unbiased for Z (Veach & Guibas 1995), so the
balance heuristic can be kept to the region r(y) >= t and pi_SFT alone can cover the rest. There a
sample drawn from pi_SFT weighs pi_SFT(y) exp(r / beta) / (n_SFT pi_SFT(y)) = exp(r / beta) / n_SFT,
which needs no log-prob at all, and a sample of any other proposal weighs 0. Only the samples above
t need scoring under every proposal, so many more pi_SFT samples can join than the scoring budget
would allow (the demo pools all 256 per prompt and scores the best 32 of them); small beta, where
pi* sits on the highest rewards, is what the threshold keeps exact. In general, with the n_j inside:

    w(y) = pi_SFT(y) exp(r / beta) / sum_j n_j q_j(y)   if r(y) >= t (any proposal drew it),
           exp(r / beta) / n_SFT                         if r(y) < t and pi_SFT drew it,
           0                                             otherwise;      Z ~ sum_i w_i.

(No threshold: the first line for every sample, the same estimate as above.) A mixture's KL can reach about
log(sum_j n_j q_j(y) / pi_SFT(y)) of its best samples, so proposals far from pi_SFT (the trained
policies) carry the estimate to the KL the methods reach.

Trust, stated plainly: SNIS is biased for finite M (consistent as M -> oo). Each point reports the
effective sample size ESS = (sum w)^2 / sum w^2 per prompt (Kong 1992), between 1 and M, and is
``trusted`` when the harmonic mean of the prompts' ESS is at least MIN_ESS. Why that rule: the
leading bias of SNIS on a prompt is -E_q[w_bar^2 (r - E*[r])] / M (w_bar = w / E_q[w]), at most
(spread of r under pi*) / ESS in size, and its standard error is about sd*(r) / sqrt(ESS). Averaged
over prompts the standard errors shrink but the biases add up, as the mean of 1 / ESS does, so the
mean over prompts of 1 / ESS (one over the harmonic mean) is what a point's error follows. At
ESS >= 10 the bias is at most a tenth of the target's reward spread and the error of log Z (which
enters KL) about 1 / (2 ESS) = 0.05 nats. ESS is a necessary check, not a sufficient one: it is
computed from the weights of the samples drawn, so a region of pi*'s mass that no proposal ever
visits goes unseen by it (the estimate is then low and the ESS can still look fine).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

MIN_ESS = 10.0   # a frontier point is trusted when the harmonic mean of its prompts' ESS reaches this


class FrontierPoint(NamedTuple):
    beta: float
    mean_reward: float
    mean_kl: float
    ess_mean: float = math.nan     # mean over prompts of the per-prompt effective sample size
    ess_min: float = math.nan      # the smallest prompt's ESS
    ess_hmean: float = math.nan    # harmonic mean over prompts: the number ``trusted`` is judged by
    trusted: bool = True           # ess_hmean >= min_ess (see the module docstring)


class TiltedEstimate(NamedTuple):
    """Per-prompt estimates for one beta, each (P,)."""
    mean_reward: np.ndarray      # E*[r]
    kl: np.ndarray               # KL(pi*_beta || pi_SFT), nats per completion
    log_z: np.ndarray            # log Z(x), the normaliser of pi_SFT exp(r / beta)
    ess: np.ndarray              # (sum w)^2 / sum w^2, in [1, M]
    weights: np.ndarray          # (P, M) w / sum w per prompt: E*[f] ~ sum_i weights_i f_i for any f of the samples


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(top, axis) + np.log(np.exp(x - top).sum(axis=axis))


def _check_pool(rewards: np.ndarray, ref_logps: np.ndarray, proposal_logps: np.ndarray, counts: np.ndarray,
                scored: np.ndarray) -> None:
    if rewards.ndim != 2 or ref_logps.shape != rewards.shape:
        raise ValueError(f"rewards {rewards.shape} and ref_logps {ref_logps.shape} must both be (prompts, samples)")
    if proposal_logps.shape[:2] != rewards.shape or proposal_logps.ndim != 3:
        raise ValueError(f"proposal_logps {proposal_logps.shape} must be (prompts, samples, proposals) "
                         f"with (prompts, samples) = {rewards.shape}")
    if counts.shape != proposal_logps.shape[2:] or (counts <= 0).any() or counts.sum() != rewards.shape[1]:
        raise ValueError(f"counts {counts.tolist()} must give each of the {proposal_logps.shape[2]} proposals a "
                         f"positive number of samples per prompt, summing to the pool's {rewards.shape[1]}")
    if np.isnan(rewards).any():
        raise ValueError("rewards hold NaN: every pooled sample needs its reward")
    unscored = scored & (np.isnan(proposal_logps).any(axis=2) | np.isnan(ref_logps))
    if unscored.any():
        p, i = map(int, np.argwhere(unscored)[0])
        raise ValueError(f"{int(unscored.sum())} sample(s) at or above the threshold lack a log-prob (first: prompt "
                         f"{p}, sample {i}): each needs log q_j under every proposal and log pi_SFT")


def tilted_estimates(rewards, ref_logps, proposal_logps, counts, beta: float, threshold=None,
                     ref_proposal: int = 0) -> TiltedEstimate:
    """Balance-heuristic SNIS of pi*_beta for every prompt (module docstring).

    rewards: (P, M) gold rewards of the pooled samples; ref_logps: (P, M) log pi_SFT(y | x) of each;
    proposal_logps: (P, M, J) log q_j(y | x) of each sample under each proposal (pi_SFT among them
    when it was sampled from); counts: (J,) samples drawn per prompt from each proposal, summing
    to M. Without a threshold, which proposal drew which sample does not matter: only the mixture does.

    threshold: (P,) rewards t(x), or None (every sample in the balance heuristic). With one, the
    samples lie in blocks of counts[j] in proposal order, proposal ``ref_proposal`` is pi_SFT, and
    a sample under t needs no log-prob (NaN is fine): pi_SFT's count there, the others weigh 0.
    """
    rewards, ref_logps = np.asarray(rewards, np.float64), np.asarray(ref_logps, np.float64)
    proposal_logps, counts = np.asarray(proposal_logps, np.float64), np.asarray(counts, np.int64)
    scored = (np.ones(rewards.shape, bool) if threshold is None
              else rewards >= np.asarray(threshold, np.float64).reshape(-1, 1))            # (P, M)
    _check_pool(rewards, ref_logps, proposal_logps, counts, scored)
    log_mix = _logsumexp(np.where(scored[:, :, None], proposal_logps, 0.0) + np.log(counts), axis=2)  # log sum n_j q_j
    log_w = np.where(scored, ref_logps + rewards / beta - log_mix, -np.inf)                         # (P, M) log w(y)
    if threshold is not None:
        from_ref = np.repeat(np.arange(len(counts)) == ref_proposal, counts)                          # (M,)
        log_w = np.where(~scored & from_ref, rewards / beta - math.log(counts[ref_proposal]), log_w)
    log_z = _logsumexp(log_w, axis=1)                                           # (P,) log of sum w
    w_bar = np.exp(log_w - log_z[:, None])                                      # (P, M), rows sum to 1
    mean_reward = (w_bar * rewards).sum(axis=1)                                 # E*[r]
    kl = mean_reward / beta - log_z                                             # E*[r] / beta - log Z
    return TiltedEstimate(mean_reward, kl, log_z, 1.0 / (w_bar ** 2).sum(axis=1), w_bar)


def mixture_frontier(rewards, ref_logps, proposal_logps, counts, betas: Sequence[float],
                     min_ess: float = MIN_ESS, threshold=None, ref_proposal: int = 0) -> list[FrontierPoint]:
    """(beta, E*[r], KL, ESS) of pi*_beta for each beta, averaged over prompts; shapes as in
    ``tilted_estimates``. A point is trusted when the harmonic mean of its prompts' ESS >= min_ess."""
    points = []
    for beta in betas:
        est = tilted_estimates(rewards, ref_logps, proposal_logps, counts, beta, threshold, ref_proposal)
        hmean = float(1.0 / np.mean(1.0 / est.ess))
        points.append(FrontierPoint(float(beta), float(est.mean_reward.mean()), float(est.kl.mean()),
                                    float(est.ess.mean()), float(est.ess.min()), hmean, bool(hmean >= min_ess)))
    return points


def trust_edge_beta(rewards, ref_logps, proposal_logps, counts, betas: Sequence[float], min_ess: float = MIN_ESS,
                    threshold=None, ref_proposal: int = 0, rel_tol: float = 1e-3) -> float | None:
    """Where the trusted range ends: the smallest beta whose harmonic-mean ESS still reaches min_ess, found by
    bisection in log beta between the grid's smallest trusted beta (walking down from the largest) and the next
    smaller one, which is not; shapes as in ``tilted_estimates``. None when no grid beta is trusted or all are.

    A grid says only that trust ends somewhere between two of its points, so a range ending at the last trusted
    grid point is short by up to the gap to the next (in the demo: KL 2.7 against 3.7 between beta 0.02 and
    0.01). The point at the edge is judged by the same rule as every other, to within a factor 1 + rel_tol in
    beta."""
    def hmean(beta: float) -> float:
        est = tilted_estimates(rewards, ref_logps, proposal_logps, counts, beta, threshold, ref_proposal)
        return float(1.0 / np.mean(1.0 / est.ess))

    hi = None
    for beta in sorted(betas, reverse=True):
        if hmean(beta) >= min_ess:
            hi = beta
            continue
        if hi is None:
            return None
        lo = beta
        while hi / lo > 1.0 + rel_tol:
            mid = math.sqrt(lo * hi)
            lo, hi = (lo, mid) if hmean(mid) >= min_ess else (mid, hi)
        return float(hi)
    return None


def optimum_frontier(rewards: np.ndarray, betas: Sequence[float], min_ess: float = MIN_ESS) -> list[FrontierPoint]:
    """The frontier from pi_SFT's samples alone: rewards (P, N) of N samples from pi_SFT per prompt.

    ``mixture_frontier`` with one proposal, pi_SFT itself, where w_i = exp(r_i / beta) needs no
    log-probs: E*[r] ~ sum_i w_bar_i r_i and KL ~ sum_i w_bar_i log(N w_bar_i) <= log N.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be (prompts, samples), got shape {rewards.shape}")
    zeros = np.zeros_like(rewards)
    return mixture_frontier(rewards, zeros, zeros[:, :, None], [rewards.shape[1]], betas, min_ess)


class ProxyOptimumPoint(NamedTuple):
    """pi_SFT tilted by a proxy reward (the reward model) at one beta, measured in both rewards."""
    beta: float
    gold_reward: float             # E[r*] under pi_SFT exp(proxy / beta) / Z
    proxy_reward: float            # E[proxy] under it: the objective's reward
    mean_kl: float
    ess_hmean: float
    trusted: bool


def proxy_optimum(gold: np.ndarray, proxy: np.ndarray, betas: Sequence[float],
                  min_ess: float = MIN_ESS) -> list[ProxyOptimumPoint]:
    """The optimum of  max_pi E_pi[proxy] - beta KL(pi || pi_SFT),  pi_SFT exp(proxy / beta) / Z, and the
    gold reward it gets: the most a method that optimises the reward model exactly could reach at its KL.

    gold, proxy: (P, N) rewards of N samples from pi_SFT per prompt. SNIS as ``optimum_frontier``, the
    weights now from the proxy: w_bar_i = softmax(proxy / beta)_i, E[r*] ~ sum_i w_bar_i gold_i, and KL and
    ESS as there (``optimum_frontier(proxy)`` gives the same KL, ESS and E[proxy]).
    """
    gold, proxy = np.asarray(gold, np.float64), np.asarray(proxy, np.float64)
    if gold.ndim != 2 or proxy.shape != gold.shape:
        raise ValueError(f"gold {gold.shape} and proxy {proxy.shape} must both be (prompts, samples)")
    zeros = np.zeros_like(proxy)
    points = []
    for beta in betas:
        est = tilted_estimates(proxy, zeros, zeros[:, :, None], [proxy.shape[1]], beta)
        hmean = float(1.0 / np.mean(1.0 / est.ess))
        points.append(ProxyOptimumPoint(float(beta), float((est.weights * gold).sum(1).mean()),
                                        float(est.mean_reward.mean()), float(est.kl.mean()), hmean,
                                        bool(hmean >= min_ess)))
    return points


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || pi_SFT) = log n - (n - 1) / n (Stiennon et al. 2020); an upper bound
    on the true KL that is tight when samples rarely repeat (Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


def best_of_n(rewards: np.ndarray, n: int, proxy: np.ndarray | None = None) -> tuple[float, float]:
    """Expected gold reward of best-of-n selection and its KL.

    rewards: (P, N) gold rewards of N >= n samples per prompt; proxy: (P, N) scores used to
    pick the best (a reward model; default: the gold reward itself). The expectation is exact
    over all n-subsets of the N samples: the sample ranked i-th (0-based, ascending proxy) is
    the maximum of a random n-subset with probability C(i, n-1) / C(N, n).
    Returns (mean gold reward of the pick, best_of_n_kl(n)).
    """
    return float(best_of_n_rewards(rewards, n, proxy).mean()), best_of_n_kl(n)


def best_of_n_rewards(rewards: np.ndarray, n: int, proxy: np.ndarray | None = None) -> np.ndarray:
    """(P,) expected gold reward of the best-of-n pick per prompt (``best_of_n`` averages it)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    proxy = rewards if proxy is None else np.asarray(proxy, dtype=np.float64)
    if proxy.shape != rewards.shape:
        raise ValueError(f"proxy {proxy.shape} and rewards {rewards.shape} must have the same shape")
    total = rewards.shape[1]
    if not 1 <= n <= total:
        raise ValueError(f"n must be in [1, {total}], got {n}")
    order = np.argsort(proxy, axis=1, kind="stable")
    gold_sorted = np.take_along_axis(rewards, order, axis=1)                          # (P, N)
    p_max = np.array([math.comb(i, n - 1) for i in range(total)], dtype=np.float64) / math.comb(total, n)
    return gold_sorted @ p_max


def optimum_at_kl(frontier: Sequence[FrontierPoint], kl: float) -> float:
    """Optimal mean reward at ``kl``, linear in KL between frontier points; clamped at the ends
    (beyond the largest estimated KL this understates the optimum, see the module docstring)."""
    pts = sorted(frontier, key=lambda p: p.mean_kl)
    return float(np.interp(kl, [p.mean_kl for p in pts], [p.mean_reward for p in pts]))


def gain_share(method_reward: float, method_kl: float, frontier: Sequence[FrontierPoint], sft_reward: float) -> float:
    """(method - sft) / (optimum at the method's KL - sft): 1 = on the frontier, 0 = no gain.

    NaN when the optimum at that KL is no better than SFT (e.g. KL ~ 0), where a share means nothing.
    """
    denom = optimum_at_kl(frontier, method_kl) - sft_reward
    if denom <= 1e-12:
        return float("nan")
    return (method_reward - sft_reward) / denom
