"""The procedural review corpus and the gold reward (VADER)."""
from collections import Counter

import numpy as np
import pytest

from prefalign.lab.corpus import LABEL_WEIGHTS, LABELS, generate_reviews, third_person, word_types
from prefalign.lab.gold import gold_reward, gold_rewards


@pytest.fixture(scope="module")
def reviews():
    return generate_reviews(20_000, seed=0)


def test_deterministic_for_a_seed_and_different_across_seeds():
    assert generate_reviews(200, seed=3) == generate_reviews(200, seed=3)
    assert [r.text for r in generate_reviews(50, seed=3)] != [r.text for r in generate_reviews(50, seed=4)]


def test_vocabulary_and_templates(reviews):
    types = word_types(r.text for r in reviews)
    assert len(types) >= 2000, len(types)
    frames = Counter(t.split("+")[0] for r in reviews for t in r.templates)
    combos = {t for r in reviews for t in r.templates}
    assert len(frames) >= 150 and len(combos) >= 1000, (len(frames), len(combos))
    # No frame dominates: the most used one is a small share of all sentences.
    assert frames.most_common(1)[0][1] / sum(frames.values()) < 0.05


def test_text_is_clean(reviews):
    for r in reviews[:3000]:
        assert r.text and (r.text[0].isupper() or r.text[0].isdigit()), r.text
        assert "{" not in r.text and "  " not in r.text and " a a" not in r.text, r.text
        assert r.text[-1] in ".!", r.text
        assert 1 <= len(r.templates) <= 6


def test_label_proportions(reviews):
    counts = Counter(r.sentiment_label for r in reviews)
    assert set(counts) == set(LABELS)
    for label, w in zip(LABELS, LABEL_WEIGHTS):
        # Binomial SE at n=20k is < 0.0035; 0.015 is > 4 SE.
        assert abs(counts[label] / len(reviews) - w) < 0.015, (label, counts[label])


def test_gold_reward_spreads_over_unit_interval_and_tracks_labels(reviews):
    sample = reviews[:4000]
    gold = gold_rewards(r.text for r in sample)
    assert gold.shape == (4000,) and gold.min() >= 0 and gold.max() <= 1
    hist, _ = np.histogram(gold, bins=10, range=(0, 1))
    assert (hist / len(gold) > 0.02).all(), hist          # every tenth of [0, 1] is populated
    by = {lab: gold[[r.sentiment_label == lab for r in sample]].mean() for lab in LABELS}
    assert by["positive"] > by["mixed"] > by["negative"] + 0.1 and by["positive"] > by["negative"] + 0.4, by


def test_gold_reward_values():
    assert gold_reward("") == 0.5                          # compound 0 -> 0.5
    assert gold_reward("A wonderful, brilliant film.") > 0.85
    assert gold_reward("An awful, terrible film.") < 0.15
    texts = ["good", "bad", "fine"]
    np.testing.assert_array_equal(gold_rewards(texts), [gold_reward(t) for t in texts])


def test_third_person():
    assert [third_person(v) for v in ["discover", "search", "bury", "betray", "rescue", "fix"]] == \
        ["discovers", "searches", "buries", "betrays", "rescues", "fixes"]


def test_gold_reward_fn_is_the_gold_reward_of_the_whole_review_as_a_reward_function():
    """`--reward-fn prefalign.lab.gold:gold_reward_fn` scores prompt + completion, as lab.labeler scores
    the offline pairs; chat messages are scored on their contents; the other columns are ignored."""
    from prefalign.rl.reward_functions import load_function
    spec, fn = load_function("prefalign.lab.gold:gold_reward_fn")
    assert fn(["This film was ", "Bad"], ["wonderful.", " plot."], label=["x", "y"]) == [
        gold_reward("This film was wonderful."), gold_reward("Bad plot.")]
    chat = [[{"role": "user", "content": "This film was "}]]
    assert fn(chat, [[{"role": "assistant", "content": "awful."}]]) == [gold_reward("This film was awful.")]


def test_online_dpos_judge_at_tau_is_the_labs_labeler():
    """online DPO's judge with --judge-temperature tau on gold rewards gives the lab labeler's P(y1 > y2)."""
    import torch

    from prefalign.lab.labeler import preference_probability as lab_p
    from prefalign.rl.judge import judge_pairs
    r1, r2 = np.array([0.9, 0.2, 0.5, 0.61]), np.array([0.1, 0.7, 0.5, 0.6])
    j = judge_pairs(torch.tensor(r1), torch.tensor(r2), 0.1, torch.tensor([0.5, 0.5, 0.49, 0.51]))
    np.testing.assert_allclose(j.p_first.numpy(), lab_p(r1, r2, 0.1), rtol=1e-12)
    # sigma(8) = 0.99966, sigma(-5) = 0.0067, sigma(0) = 0.5, sigma(0.1) = 0.52498
    assert j.first_chosen.tolist() == [True, False, True, True]
