"""The frontier's pool: SFT samples and every policy's evaluation samples, each scored under every policy.

The optimum pi*_beta is estimated by importance sampling from the mixture of pi_SFT and the trained
policies (lab.frontier: the balance heuristic needs log q_j(y | x) of a pooled sample under every
proposal). No new sample is drawn: per held-out prompt the pool is the N SFT samples
(sft-samples/samples.npz) and the K samples each policy's evaluation drew (eval/<name>/samples.npz).
Only the samples whose gold reward reaches the prompt's threshold t(x), the reward of its
``plan.frontier_pool_sft``-th best SFT sample, are weighed by the whole mixture; under it pi_SFT's own
samples count alone and need no log-prob (lab.frontier, ``threshold``). The evaluation already scored
its own samples under its policy and under pi_SFT (for the KL); this stage adds the remaining forwards
of the samples at or above t: the SFT ones under pi_SFT and every policy, each policy's under the
other policies. (t is an order statistic of the pooled SFT samples, so the estimate is consistent
rather than exactly unbiased; with a fixed t it would be unbiased for Z.)

A DPO run with beta targets pi*_{tau * beta} under the lab's labeler: labels follow
sigma((r1 - r2) / tau), a Bradley-Terry model with reward r / tau, and DPO's optimum is
pi_ref exp(reward / beta) = pi_ref exp(r / (tau * beta)) (DPO paper eq. 4 with r / tau).
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from prefalign.errors import PrefalignError
from prefalign.lab.demo_data import ids_lists
from prefalign.lab.demo_eval import heldout_prompts
from prefalign.lab.demo_plan import DemoPlan
from prefalign.lab.evaluate import prompt_ids, sequence_logprobs
from prefalign.lab.frontier import MIN_ESS, FrontierPoint, mixture_frontier, trust_edge_beta
from prefalign.models import load_causal_lm
from prefalign.train.logger import iter_progress, write_summary

SCORE_BATCH = 128


class Proposal(NamedTuple):
    name: str            # "sft" or the policy's eval stage name (dpo-beta1, ppo-3, ...)
    policy: Path         # the HF folder scored under
    eval_dir: Path | None   # its evaluation (samples.npz); None for pi_SFT, whose pool part is the SFT samples


class Pool(NamedTuple):
    """rewards (P, M), logps (P, M, J) with column 0 = log pi_SFT (NaN under the threshold where not
    needed), counts (J,), names (J,), threshold (P,) or None (a pool scored in full, before it had one)."""
    rewards: np.ndarray
    logps: np.ndarray
    counts: np.ndarray
    names: list[str]
    threshold: np.ndarray | None = None


def _load(path: Path, keys: Sequence[str], stage_dir: Path) -> dict:
    data = np.load(path) if path.exists() else {}
    missing = [k for k in keys if k not in data]
    if missing:
        raise PrefalignError(f"{path} lacks {', '.join(missing)}: {stage_dir} was made before the frontier pooled "
                             f"every policy's samples. Delete {stage_dir} and rerun the same command: only the "
                             f"deleted stages run again.")
    return {k: data[k] for k in keys}


def sft_threshold(sft_gold: np.ndarray, n_scored: int) -> np.ndarray:
    """(P,) the reward of each prompt's n_scored-th best SFT sample: the pool's threshold t(x)."""
    return -np.sort(-sft_gold, axis=1)[:, min(n_scored, sft_gold.shape[1]) - 1]


def gather_pool(samples_dir: Path, proposals: Sequence[Proposal], n_prompts: int):
    """Token ids (P, M) as lists, rewards (P, M), logps (P, M, J) with NaN where still unscored, counts (J,)."""
    sft = _load(samples_dir / "samples.npz", ("completion_ids", "gold"), samples_dir)
    ids = [[ids_lists(row) for row in sft["completion_ids"]]]                           # [(P, N) lists]
    rewards, counts = [sft["gold"]], [sft["gold"].shape[1]]
    known = []                                                   # (pool part, proposal column, (P, K) logps)
    for j, prop in enumerate(proposals[1:], start=1):
        ev = _load(prop.eval_dir / "samples.npz", ("completion_ids", "gold", "policy_logps", "sft_logps"),
                   prop.eval_dir)
        k = len(ev["gold"]) // n_prompts                        # sample-major (K * P,) -> prompt-major (P, K)
        if k * n_prompts != len(ev["gold"]):
            raise PrefalignError(f"{prop.eval_dir / 'samples.npz'} holds {len(ev['gold'])} samples, not a multiple "
                                 f"of the {n_prompts} held-out prompts: delete {prop.eval_dir} and rerun.")
        flat = ids_lists(ev["completion_ids"])
        ids.append([[flat[i * n_prompts + p] for i in range(k)] for p in range(n_prompts)])
        rewards.append(ev["gold"].reshape(k, n_prompts).T)
        known += [(j, j, ev["policy_logps"].reshape(k, n_prompts).T), (j, 0, ev["sft_logps"].reshape(k, n_prompts).T)]
        counts.append(k)
    starts = np.cumsum([0] + counts)
    logps = np.full((n_prompts, starts[-1], len(proposals)), np.nan)
    for part, column, values in known:
        logps[:, starts[part]:starts[part + 1], column] = values
    pool_ids = [list(itertools.chain.from_iterable(part[p] for part in ids)) for p in range(n_prompts)]   # (P, M)
    return pool_ids, np.concatenate(rewards, axis=1), logps, np.array(counts)


def score_pool(d: Path, samples_dir: Path, proposals: Sequence[Proposal], data_dir: Path, plan: DemoPlan) -> None:
    """Fill every (sample, proposal) log-prob of the samples at or above the threshold that the evaluations
    did not compute; write pool.npz + summary.json."""
    prompts = heldout_prompts(data_dir)
    pool_ids, rewards, logps, counts = gather_pool(samples_dir, proposals, len(prompts))
    threshold = sft_threshold(rewards[:, :counts[0]], plan.frontier_pool_sft)
    needed = rewards >= threshold[:, None]                                              # (P, M)
    _, tokenizer = load_causal_lm(str(proposals[0].policy))
    p_ids = [prompt_ids(tokenizer, p) for p in prompts]
    # Jobs: (proposal, batch of missing entries), shortest sequences first so a batch pads little.
    jobs = []
    for j in range(len(proposals)):
        todo = sorted(zip(*np.nonzero(np.isnan(logps[:, :, j]) & needed)), key=lambda pm: len(pool_ids[pm[0]][pm[1]]))
        jobs += [(j, todo[s:s + SCORE_BATCH]) for s in range(0, len(todo), SCORE_BATCH)]
    model, loaded = None, None
    for j, batch in iter_progress(jobs, len(jobs), f"pool scores under {len(proposals)} policies", unit="batch"):
        if loaded != j:   # jobs are grouped by proposal: each model is loaded once
            model, _ = load_causal_lm(str(proposals[j].policy))
            model.eval()
            loaded = j
        scores = sequence_logprobs(model, [p_ids[p] for p, _ in batch], [pool_ids[p][m] for p, m in batch],
                                   batch_size=SCORE_BATCH, pad_id=tokenizer.pad_token_id)
        for (p, m), value in zip(batch, scores.tolist()):
            logps[p, m, j] = value
    np.savez_compressed(d / "pool.npz", rewards=rewards, logps=logps, counts=counts, threshold=threshold,
                        names=np.array([prop.name for prop in proposals]))
    write_summary(d, {"stage": "frontier-pool", "prompts": len(prompts), "samples_per_prompt": int(counts.sum()),
                      "scored_per_prompt": float(needed.sum() / len(prompts)),
                      "sft_scored_per_prompt": float(needed[:, :counts[0]].sum() / len(prompts)),
                      "proposals": [{"name": prop.name, "policy": str(prop.policy), "samples_per_prompt": int(n)}
                                    for prop, n in zip(proposals, counts)],
                      "forwards": int(sum(len(b) for _, b in jobs)),
                      "forwards_reused_from_evaluations": int(2 * (counts.sum() - counts[0]) * len(prompts))})


def load_pool(pool_dir: Path) -> Pool:
    data = np.load(pool_dir / "pool.npz")
    return Pool(data["rewards"], data["logps"], data["counts"], [str(n) for n in data["names"]],
                data["threshold"] if "threshold" in data else None)


def pool_frontier(pool: Pool, betas: Sequence[float]) -> list[FrontierPoint]:
    """lab.frontier.mixture_frontier over the pool, pi_SFT (column 0) as the reference."""
    return mixture_frontier(pool.rewards, pool.logps[:, :, 0], pool.logps, pool.counts, betas,
                            threshold=pool.threshold, ref_proposal=0)


def frontier_betas(pool: Pool, grid: Sequence[float]) -> list[float]:
    """The plan's betas and the beta where the pool's trusted range ends between two of them
    (lab.frontier.trust_edge_beta), ascending: the frontier, its standard errors and the reward model's
    optimum are all computed at these."""
    edge = trust_edge_beta(pool.rewards, pool.logps[:, :, 0], pool.logps, pool.counts, grid,
                           threshold=pool.threshold, ref_proposal=0)
    return sorted(set(grid) | ({edge} if edge is not None else set()))


def dpo_targets(pool: Pool, dpo_rows: Sequence[dict], tau: float) -> list[dict]:
    """Each DPO setting next to the optimum it targets, pi*_{tau * beta} (module docstring)."""
    out = []
    for row in dpo_rows:
        (target,) = pool_frontier(pool, [tau * row["beta"]])
        out.append({"dpo_beta": row["beta"], "frontier_beta": tau * row["beta"], "tau": tau,
                    "target_reward": target.mean_reward, "target_kl": target.mean_kl,
                    "target_ess_hmean": target.ess_hmean, "target_trusted": target.trusted,
                    "dpo_gold_reward": row["gold_reward"], "dpo_kl": row["kl"]})
    return out


def pool_record(pool: Pool) -> dict:
    """results.json's description of the estimator and its pool."""
    region = ("" if pool.threshold is None else
              " over the samples whose gold reward reaches the prompt's threshold (its frontier_pool_sft-th best "
              "SFT sample's), pi_SFT's samples alone under it")
    record = {"estimator": "self-normalised importance sampling from the mixture of pi_SFT and the trained policies "
                           f"(balance heuristic{region}); a point is trusted when the harmonic mean of its prompts' ESS "
                           f">= {MIN_ESS:g}",
              "min_ess": MIN_ESS, "samples_per_prompt": int(pool.counts.sum()),
              "proposals": {name: int(n) for name, n in zip(pool.names, pool.counts)}}
    if pool.threshold is not None:
        needed = pool.rewards >= pool.threshold[:, None]
        record["scored_per_prompt"] = float(needed.mean(axis=0).sum())
        record["sft_scored_per_prompt"] = float(needed[:, :pool.counts[0]].mean(axis=0).sum())
    return record
