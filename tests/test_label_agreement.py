"""Agreement statistics: fixed values derived by hand, and Fleiss' kappa against a second formulation."""
import itertools
import random

import pytest

from prefalign.label.agreement import cohen_kappa, fleiss_kappa, majority, pairwise_cohen, percent_agreement


def test_majority():
    assert majority(["i", "i", "j"]) == ("i", pytest.approx(2 / 3))
    assert majority(["i", "j"]) == (None, 0.5)          # a tied vote has no majority
    assert majority(["tie"]) == ("tie", 1.0)
    assert majority([]) == (None, 0.0)


def test_cohen_kappa_by_hand():
    # 10 items. Rater 1: i x6, j x4. Rater 2: i x5, j x5. They agree on 4 i + 3 j = 7.
    pairs = [("i", "i")] * 4 + [("i", "j")] * 2 + [("j", "i")] * 1 + [("j", "j")] * 3
    # p_o = 0.7; p_e = 0.6*0.5 + 0.4*0.5 = 0.5; kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    assert cohen_kappa(pairs) == pytest.approx(0.4, abs=1e-12)
    assert cohen_kappa([("i", "i"), ("j", "j")]) == pytest.approx(1.0)
    # Perfect disagreement over two balanced categories: p_o = 0, p_e = 0.5, kappa = -1.
    assert cohen_kappa([("i", "j"), ("j", "i")]) == pytest.approx(-1.0)
    assert cohen_kappa([("i", "i"), ("i", "i")]) is None  # p_e = 1: undefined
    assert cohen_kappa([]) is None


def test_fleiss_kappa_by_hand():
    # 3 items x 3 raters. Item 1: i,i,i -> P=1. Item 2: i,i,j -> P=(2*1)/(3*2)=1/3. Item 3: j,j,tie -> 1/3.
    # P_bar = 5/9. Ratings: i 5, j 3, tie 1 of 9 -> P_e = (25 + 9 + 1) / 81 = 35/81.
    # kappa = (5/9 - 35/81) / (1 - 35/81) = (45 - 35) / (81 - 35) = 10/46.
    ratings = {1: {"a": "i", "b": "i", "c": "i"}, 2: {"a": "i", "b": "i", "c": "j"},
               3: {"a": "j", "b": "j", "c": "tie"}}
    assert fleiss_kappa(ratings) == pytest.approx(10 / 46, abs=1e-12)
    assert fleiss_kappa({1: {"a": "i"}}) is None           # nobody overlaps
    assert fleiss_kappa({1: {"a": "i", "b": "i"}}) is None  # one category used: P_e = 1


def test_fleiss_with_two_raters_is_scotts_pi():
    # With two raters on every item Fleiss' kappa reduces to Scott's pi: pooled marginals.
    rng = random.Random(0)
    cats = ["i", "j", "tie", "both_bad"]
    ratings = {n: {"a": rng.choice(cats), "b": rng.choice(cats[:2])} for n in range(40)}
    pairs = [(r["a"], r["b"]) for r in ratings.values()]
    p_o = sum(x == y for x, y in pairs) / len(pairs)
    pooled = [x for p in pairs for x in p]
    p_e = sum((pooled.count(c) / len(pooled)) ** 2 for c in cats)
    assert fleiss_kappa(ratings) == pytest.approx((p_o - p_e) / (1 - p_e), abs=1e-12)


def test_fleiss_varying_raters_matches_pair_counting():
    # P_i is the share of agreeing ordered rater pairs in item i; count them with a plain loop.
    rng = random.Random(1)
    cats = ["i", "j", "tie"]
    ratings = {n: {f"r{k}": rng.choice(cats) for k in range(rng.randint(2, 5))} for n in range(30)}
    p_items = []
    for by in ratings.values():
        votes = list(by.values())
        ordered = [(x, y) for x, y in itertools.permutations(range(len(votes)), 2)]
        p_items.append(sum(votes[x] == votes[y] for x, y in ordered) / len(ordered))
    all_votes = [v for by in ratings.values() for v in by.values()]
    p_e = sum((all_votes.count(c) / len(all_votes)) ** 2 for c in cats)
    p_bar = sum(p_items) / len(p_items)
    assert fleiss_kappa(ratings) == pytest.approx((p_bar - p_e) / (1 - p_e), abs=1e-12)


def test_percent_agreement_and_pairwise_cohen():
    ratings = {1: {"ann": "i", "bob": "i", "cy": "j"}, 2: {"ann": "j", "bob": "j"}, 3: {"ann": "i"}}
    # Pairs: item 1 -> (ann,bob) agree, (ann,cy) no, (bob,cy) no; item 2 -> agree. 2 of 4.
    assert percent_agreement(ratings) == (0.5, 4)
    by_pair = {(c["a"], c["b"]): c for c in pairwise_cohen(ratings)}
    assert by_pair[("ann", "bob")]["n"] == 2 and by_pair[("ann", "bob")]["kappa"] == pytest.approx(1.0)
    assert by_pair[("ann", "cy")]["agreement"] == 0.0
