"""The lab's ground-truth reward r*(text): VADER compound sentiment mapped to [0, 1].

VADER (Hutto & Gilbert 2014) is a rule-based sentiment scorer whose lexicon ships inside the
``vaderSentiment`` package, so the gold reward needs no download and is identical everywhere.
It plays the role of the IMDb sentiment classifier in DPO's controlled-sentiment experiment
(Rafailov et al. 2023, sec. 6.1).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np


@lru_cache(maxsize=1)
def analyzer():
    """One SentimentIntensityAnalyzer per process (it reads its lexicon file when built)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    return SentimentIntensityAnalyzer()


def gold_reward(text: str) -> float:
    """r*(text) = (compound + 1) / 2 in [0, 1]; 0.5 is neutral."""
    return (analyzer().polarity_scores(text)["compound"] + 1.0) / 2.0


def gold_rewards(texts: Iterable[str]) -> np.ndarray:
    """Gold rewards of many texts, shape (N,) float64. About 50 us per short review."""
    sia = analyzer()
    return np.array([(sia.polarity_scores(t)["compound"] + 1.0) / 2.0 for t in texts], dtype=np.float64)


def gold_reward_fn(prompts: Sequence, completions: Sequence, **columns) -> list[float]:
    """The gold reward as a `--reward-fn` (``prefalign.lab.gold:gold_reward_fn``): r*(prompt + completion),
    the whole review, as lab.labeler scores the offline pairs. Chat prompts and completions (lists of
    messages) are scored on their message contents joined. The prompt file's other columns are ignored."""
    return [float(r) for r in gold_rewards(_text(p) + _text(c) for p, c in zip(prompts, completions))]


def _text(x) -> str:
    return x if isinstance(x, str) else "".join(m["content"] for m in x)
