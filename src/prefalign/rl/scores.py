"""What PPO's reward is built from: the reward model's (or reward function's) raw scores, whitened
by running statistics when --normalize-scores, clipped to --score-clip, minus --missing-eos-penalty
for completions that never ended."""
from __future__ import annotations

import math

import torch

from prefalign.losses import global_moments


class RunningMoments:
    """Running mean and variance of scores over all iterations and ranks (Chan et al. parallel update).

    ``update(scores)`` folds this iteration's global batch in; ``normalize`` uses the statistics
    including it, so the first iteration is whitened by its own batch.
    """

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0.0

    def update(self, scores: torch.Tensor) -> None:
        mask = torch.ones_like(scores, dtype=torch.bool)
        mean, var, n = (float(v) for v in global_moments(scores.double(), mask))
        var = var * (n - 1) / n if n > 1 else 0.0  # population variance of the batch
        total = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta ** 2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.mean) / math.sqrt(self.var + 1e-8)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def final_scores(raw: torch.Tensor, ended_with_eos: torch.Tensor, cfg, stats: RunningMoments) -> torch.Tensor:
    """(B,) scores the reward is built from: running whitening, clipping, then the missing-EOS penalty."""
    scores = raw.float()
    if cfg.normalize_scores:
        stats.update(scores)
        scores = stats.normalize(scores)
    if cfg.score_clip is not None:
        scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
    return penalise_missing_eos(scores, ended_with_eos, cfg.missing_eos_penalty)


def penalise_missing_eos(scores: torch.Tensor, ended_with_eos: torch.Tensor, penalty) -> torch.Tensor:
    """(B,) scores less `penalty` where a completion did not end with EOS (TRL's missing_eos_penalty; None: off)."""
    return scores if penalty is None else scores - penalty * (~ended_with_eos).float()
