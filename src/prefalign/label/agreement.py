"""Agreement between labelers: majority vote, pairwise percent agreement, Cohen's and Fleiss' kappa.

Pure functions over ``ratings``: item id -> {labeler: outcome}, where an outcome is one of the
categories "i" (first completion better), "j", "tie", "both_bad". Skips are not ratings and
never enter here. Kappas are ``None`` where undefined (too few ratings, or chance agreement 1).
"""
from __future__ import annotations

from collections import Counter
from itertools import combinations
from typing import Hashable, Optional

Ratings = dict[Hashable, dict[str, str]]


def majority(outcomes: list[str]) -> tuple[Optional[str], float]:
    """The most frequent outcome and its share of the votes; (None, share) when the top is tied."""
    if not outcomes:
        return None, 0.0
    (top, n), *rest = Counter(outcomes).most_common()
    share = n / len(outcomes)
    if rest and rest[0][1] == n:
        return None, share
    return top, share


def percent_agreement(ratings: Ratings) -> tuple[Optional[float], int]:
    """Share of agreeing (labeler, labeler) pairs over every item two or more people rated;
    returns (share, number of pairs)."""
    agree = pairs = 0
    for by_labeler in ratings.values():
        for x, y in combinations(by_labeler.values(), 2):
            pairs += 1
            agree += x == y
    return (agree / pairs if pairs else None), pairs


def cohen_kappa(pairs: list[tuple[str, str]]) -> Optional[float]:
    """Cohen's kappa of two raters over the items both rated: (p_o - p_e) / (1 - p_e), with
    p_e = sum_k p_1(k) p_2(k) from each rater's own marginals (Cohen 1960, eq. 1)."""
    n = len(pairs)
    if n == 0:
        return None
    p_o = sum(x == y for x, y in pairs) / n
    first, second = Counter(x for x, _ in pairs), Counter(y for _, y in pairs)
    p_e = sum(first[k] * second[k] for k in first) / (n * n)
    if p_e >= 1.0:
        return None  # both raters used a single, shared category: agreement is fixed, kappa undefined
    return (p_o - p_e) / (1 - p_e)


def pairwise_cohen(ratings: Ratings) -> list[dict]:
    """Cohen's kappa and percent agreement for every pair of labelers with common items."""
    common: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for by_labeler in ratings.values():
        for a, b in combinations(sorted(by_labeler), 2):
            common.setdefault((a, b), []).append((by_labeler[a], by_labeler[b]))
    return [{"a": a, "b": b, "n": len(p), "agreement": sum(x == y for x, y in p) / len(p), "kappa": cohen_kappa(p)}
            for (a, b), p in sorted(common.items())]


def fleiss_kappa(ratings: Ratings) -> Optional[float]:
    """Fleiss' kappa over items rated by two or more people, allowing a different number of
    raters per item: P_i = sum_k n_ik (n_ik - 1) / (n_i (n_i - 1)) is item i's share of agreeing
    rater pairs, P_bar their mean, p_k the share of all ratings in category k, P_e = sum_k p_k^2,
    kappa = (P_bar - P_e) / (1 - P_e) (Fleiss 1971, eqs. 2-9; equal to it when n_i is constant)."""
    items = [Counter(by_labeler.values()) for by_labeler in ratings.values() if len(by_labeler) >= 2]
    if not items:
        return None
    p_items = []
    totals: Counter = Counter()
    for counts in items:
        n_i = sum(counts.values())
        p_items.append(sum(c * (c - 1) for c in counts.values()) / (n_i * (n_i - 1)))
        totals.update(counts)
    n_ratings = sum(totals.values())
    p_bar = sum(p_items) / len(p_items)
    p_e = sum((c / n_ratings) ** 2 for c in totals.values())
    if p_e >= 1.0:
        return None
    return (p_bar - p_e) / (1 - p_e)


def summary(ratings: Ratings) -> dict:
    """Everything the stats page shows about agreement."""
    share, n_pairs = percent_agreement(ratings)
    return {"percent_agreement": share, "rater_pairs": n_pairs,
            "items_with_2plus": sum(len(r) >= 2 for r in ratings.values()),
            "fleiss_kappa": fleiss_kappa(ratings), "cohen": pairwise_cohen(ratings)}
