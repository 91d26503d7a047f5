"""Evaluate a policy on held-out prompts: gold reward, sequence-level KL to the SFT model, win rate.

KL(pi || pi_SFT) = E_{y ~ pi}[log pi(y|x) - log pi_SFT(y|x)], estimated from the policy's own
samples with both log-probabilities computed by teacher-forced forward passes (the k1 estimator:
unbiased, individual terms may be negative, the mean is >= 0 in expectation).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from prefalign.lab.gold import gold_rewards
from prefalign.rollout import sample
from prefalign.train.logger import iter_progress


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, temperature: float = 1.0,
                       batch_size: int = 16, seed: int = 0, progress: str | None = None) -> list[list[int]]:
    """Sampled completion ids per prompt, cut after the first EOS (the EOS is kept: it was sampled).

    prefalign.rollout.sample does the sampling (KV cache, left padding), the sampler PPO trains with.
    progress: a description to show a progress bar over batches (None: no bar).
    """
    generator = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[int]] = []
    starts = range(0, len(prompts), batch_size)
    for start in iter_progress(starts, len(starts), progress or "", enabled=progress is not None, unit="batch"):
        encoded = [prompt_ids(tokenizer, p) for p in prompts[start:start + batch_size]]
        rollout = sample(model, encoded, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=pad, temperature=temperature, generator=generator)
        out += [ids[mask].tolist() for ids, mask in zip(rollout.response_ids, rollout.response_mask)]
    return out


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Prompt token ids as training saw them (with the tokenizer's own specials, e.g. bos)."""
    return tokenizer(prompt)["input_ids"]


@torch.no_grad()
def sequence_logprob(model, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> float:
    """log pi(completion | prompt) = sum_t log pi(c_t | prompt, c_<t), one teacher-forced forward."""
    return float(sequence_logprobs(model, [prompt_ids], [completion_ids])[0])


@torch.no_grad()
def sequence_logprobs(model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                      batch_size: int = 16, pad_id: int = 0) -> torch.Tensor:
    """Batched ``sequence_logprob``: (N,) float64 summed completion log-probs (right padding)."""
    totals = []
    for start in range(0, len(prompts), batch_size):
        rows = [list(p) + list(c) for p, c in zip(prompts[start:start + batch_size], completions[start:start + batch_size])]
        width = max(map(len, rows))
        input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])             # (B, T)
        attention_mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
        completion_mask = torch.zeros_like(attention_mask)                                      # (B, T) bool
        for i, (p, c) in enumerate(zip(prompts[start:start + batch_size], completions[start:start + batch_size])):
            completion_mask[i, len(p):len(p) + len(c)] = True
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()     # (B, T, V)
        logps = torch.log_softmax(logits[:, :-1], dim=-1)                                       # (B, T-1, V)
        token_logps = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)                     # (B, T-1)
        totals.append((token_logps * completion_mask[:, 1:]).sum(-1).double())                 # (B,)
    return torch.cat(totals) if totals else torch.zeros(0, dtype=torch.float64)


def win_rate(rewards: np.ndarray, baseline_rewards: np.ndarray) -> float:
    """Paired win rate: mean of 1[r > r_base] + 0.5 * 1[r == r_base] over the same prompts."""
    rewards, baseline_rewards = np.asarray(rewards), np.asarray(baseline_rewards)
    if rewards.shape != baseline_rewards.shape:
        raise ValueError(f"rewards {rewards.shape} and baseline {baseline_rewards.shape} must pair up")
    return float(np.mean((rewards > baseline_rewards) + 0.5 * (rewards == baseline_rewards)))


@dataclass
class Evaluation:
    gold_reward: float              # mean gold reward of prompt + completion
    kl: float                       # mean of log pi - log pi_SFT over the policy's samples (nats/sequence)
    win_rate_vs_sft: float | None   # None when no baseline rewards were given
    rewards: np.ndarray             # (N,) per-sample gold rewards, aligned with prompts
    completions: list[str]          # (N,) decoded completions
    completion_ids: list[list[int]] = field(default_factory=list)   # (N,) the sampled token ids (EOS kept)
    policy_logps: np.ndarray = field(default_factory=lambda: np.zeros(0))   # (N,) log pi(completion | prompt)
    ref_logps: np.ndarray = field(default_factory=lambda: np.zeros(0))      # (N,) log pi_SFT(completion | prompt)


def evaluate_policy(policy, sft_model, tokenizer, prompts: Sequence[str], baseline_rewards: np.ndarray | None = None,
                    max_new_tokens: int = 32, seed: int = 0,
                    score: Callable[[Sequence[str]], np.ndarray] = gold_rewards,
                    progress: str | None = None) -> Evaluation:
    """Sample one completion per prompt from ``policy`` and measure it.

    baseline_rewards: (N,) gold rewards of SFT samples for the same prompts (the SFT model's
    own Evaluation.rewards); repeat a prompt in ``prompts`` to average over several samples.
    """
    completion_ids = sample_completions(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed,
                                        batch_size=64, progress=progress)
    p_ids = [prompt_ids(tokenizer, p) for p in prompts]
    pad = tokenizer.pad_token_id
    policy_logps = sequence_logprobs(policy, p_ids, completion_ids, pad_id=pad).numpy()          # (N,)
    ref_logps = sequence_logprobs(sft_model, p_ids, completion_ids, pad_id=pad).numpy()          # (N,)
    completions = [tokenizer.decode(c, skip_special_tokens=True) for c in completion_ids]
    rewards = score([p + c for p, c in zip(prompts, completions)])
    wins = None if baseline_rewards is None else win_rate(rewards, baseline_rewards)
    return Evaluation(float(rewards.mean()), float((policy_logps - ref_logps).mean()), wins, rewards, completions,
                      completion_ids, policy_logps, ref_logps)
