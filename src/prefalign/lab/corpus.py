"""A procedural English movie-review generator: the lab's stand-in for IMDb.

Every review is planned as a sequence of sentence roles (opening, plot, opinion, contrast,
verdict, shrug), each role is realised by a frame from ``templates`` whose slots are filled
from the hand-written ``lexicon``. Opinion slots follow the sentence's polarity and a
per-review intensity, so the gold reward (VADER) spreads over [0, 1] instead of piling at
its ends. Seeded and pure Python: ``generate_reviews(n, seed)`` is identical on every machine.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from prefalign.lab import lexicon as L
from prefalign.lab.templates import GROUPS

LABELS = ("positive", "negative", "mixed", "neutral")
# Roughly IMDb-like: polar reviews dominate, with a tail of mixed and purely descriptive ones.
LABEL_WEIGHTS = (0.38, 0.34, 0.16, 0.12)
# Sentences per review, 1..6.
LENGTH_WEIGHTS = (0.08, 0.16, 0.22, 0.22, 0.18, 0.14)

REC = {1: L.words("would recommend | highly recommend | would happily recommend | warmly recommend | can recommend"),
       -1: L.words("would not recommend | cannot recommend | would never recommend | could not recommend")}
AGAIN = {1: L.words("would gladly | will happily | would love to | cannot wait to"),
         -1: L.words("would never | will not | could not bear to | refuse to")}
# Connectives that would read oddly before these openings.
NO_CONNECTIVE = ("Rating", "{rating}", "In a word", "Simply", "Along", "Years", "Directed", "Based", "How",
                 "What", "Overall", "Final", "All told", "In the end", "Meanwhile", "So ", "Here")
PLACES_NAMED = [p for p in L.PLACES if not p.startswith(("a ", "an "))]


@dataclass(frozen=True)
class Review:
    text: str
    sentiment_label: str        # one of LABELS
    templates: tuple[str, ...] = ()   # "group:index" of each sentence's frame (with "+connective")


def third_person(verb: str) -> str:
    """discover -> discovers, rescue -> rescues, search -> searches, bury -> buries."""
    if verb.endswith(("s", "sh", "ch", "x", "z")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _title(rng: random.Random) -> str:
    a, n = rng.choice(L.TITLE_ADJECTIVES), rng.choice(L.TITLE_NOUNS)
    return rng.choice([f"The {a} {n}", f"{a} {n}", f"The {n}", f"{n} in {rng.choice(PLACES_NAMED)}",
                       f"A {n} for {rng.choice(L.FIRST_NAMES)}", f"{rng.choice(L.FIRST_NAMES)} and the {n}",
                       f"{a} {n} {rng.choice(['II', 'III', 'Returns', 'Rising'])}"])


@dataclass
class _Sentence:
    """What a frame needs to fill its slots: polarity +1/-1/0 and intensity in [0, 1]."""
    polarity: int
    intensity: float
    title: str


def _adjective(rng, polarity: int, intensity: float) -> str:
    strong = rng.random() < intensity
    if polarity > 0:
        return rng.choice(L.ADJ_POS_STRONG if strong else L.ADJ_POS_MILD)
    return rng.choice(L.ADJ_NEG_STRONG if strong else L.ADJ_NEG_MILD)


def _adverb(rng, intensity: float) -> str:
    # Intense reviews boost ("extremely good"), lukewarm ones hedge ("somewhat good"): VADER grades both.
    u = rng.random()
    if u < 0.6 * intensity:
        return rng.choice(L.ADV_STRONG)
    if u > 1 - 0.5 * (1 - intensity):
        return rng.choice(L.ADV_HEDGE)
    return ""


def _rating(rng, polarity: int, intensity: float) -> str:
    strong = rng.random() < intensity
    if polarity > 0:
        return str(rng.choice([9, 10] if strong else [7, 8]))
    return str(rng.choice([1, 2] if strong else [3, 4]))


def _slot(name: str, s: _Sentence, rng: random.Random) -> str:
    """The value of one slot ({name}) for sentence ``s``."""
    p, k = s.polarity, s.intensity
    fixed = {"genre": L.GENRES, "place": L.PLACES, "role": L.ROLES, "object": L.OBJECTS, "aspect": L.ASPECTS,
             "desc": L.ADJ_NEUTRAL, "when": L.WHEN, "venue": L.VENUES, "companion": L.COMPANIONS,
             "audience": L.AUDIENCES, "first": L.FIRST_NAMES, "verb": L.VERBS_PLOT, "journey": L.VERBS_JOURNEY,
             "padj": L.ADJ_POS_STRONG + L.ADJ_POS_MILD, "nadj": L.ADJ_NEG_STRONG + L.ADJ_NEG_MILD,
             "pverb": L.VERB_POS, "nverb": L.VERB_NEG, "pnoun": L.NOUN_POS, "nnoun": L.NOUN_NEG,
             "trait": L.TRAITS, "theme": L.THEMES, "era": L.ERAS, "colour": L.COLOURS, "instrument": L.INSTRUMENTS,
             "animal": L.ANIMALS, "snack": L.SNACKS, "weather": L.WEATHER, "event": L.EVENTS,
             "relative": L.RELATIVES, "craft": L.CRAFTS, "pmly": L.MANNER_POS, "nmly": L.MANNER_NEG}
    if name in fixed:
        return rng.choice(fixed[name])
    if name == "title":
        return s.title
    if name == "name":
        return f"{rng.choice(L.FIRST_NAMES)} {rng.choice(L.SURNAMES)}"
    if name == "plotverb":
        return third_person(rng.choice(L.VERBS_PLOT))
    if name == "year":
        return str(rng.randint(1935, 2024))
    if name == "minutes":
        return str(rng.randint(78, 195))
    if name == "midrating":
        return str(rng.choice([5, 6]))
    if name == "adj":
        return _adjective(rng, p, k)
    if name == "opp":       # "never dull" in a positive sentence: negation carries the polarity
        return _adjective(rng, -p, 0.3)
    if name == "adv":
        return _adverb(rng, k)
    if name == "rating":
        return _rating(rng, p, k)
    polar = {"noun": (L.NOUN_POS, L.NOUN_NEG), "pv": (L.VERB_POS, L.VERB_NEG), "rec": (REC[1], REC[-1]),
             "feeling": (L.FEELINGS_POS, L.FEELINGS_NEG), "again": (AGAIN[1], AGAIN[-1]),
             "mly": (L.MANNER_POS, L.MANNER_NEG)}
    if name in polar:
        return rng.choice(polar[name][0] if p > 0 else polar[name][1])
    raise KeyError(f"template slot {{{name}}} has no filler")


def _tidy(text: str) -> str:
    text = re.sub(r" {2,}", " ", text).replace(" ,", ",").replace(" .", ".").replace(" ;", ";")
    # Articles: "a extremely good" -> "an extremely good"; "a honest" -> "an honest".
    text = re.sub(r"\b([Aa]) (?=[aeiouAEIOU]|honest)", lambda m: m.group(1) + "n ", text)
    return text[:1].upper() + text[1:]


def realise(group: str, index: int, s: _Sentence, rng: random.Random, connective_p: float = 0.2) -> tuple[str, str]:
    """Fill frame ``GROUPS[group][index]``; returns (sentence, template id)."""
    frame = GROUPS[group][index]
    used: dict[str, set[str]] = {}

    def fill(m: re.Match) -> str:
        pool = m.group(1).rstrip("0123456789")
        for _ in range(6):  # {aspect2} differs from {aspect}
            value = _slot(pool, s, rng)
            if value not in used.setdefault(pool, set()):
                break
        used[pool].add(value)
        return value

    text = _tidy(re.sub(r"\{(\w+)\}", fill, frame))
    tid = f"{group}:{index}"
    if group != "opening" and not frame.startswith(NO_CONNECTIVE) and rng.random() < connective_p:
        polar_pool = L.CONNECTIVES_POS if s.polarity > 0 else L.CONNECTIVES_NEG
        pool = polar_pool if group in ("opinion", "verdict") and rng.random() < 0.3 else L.CONNECTIVES
        connective = rng.choice(pool)
        keep_case = frame.startswith(("{", "I "))
        text = f"{connective}, {text if keep_case else text[:1].lower() + text[1:]}"
        tid += "+" + connective
    if s.polarity and group in ("opinion", "verdict") and text.endswith(".") and rng.random() < 0.3 * s.intensity:
        text = text[:-1] + "!"
    return text, tid


def _plan(label: str, n: int, rng: random.Random) -> list[tuple[str, int]]:
    """Sentence roles and polarities of one review of ``n`` sentences."""
    if label == "neutral":
        if n == 1:
            return [(rng.choice(["opening", "plot", "shrug"]), 0)]
        head = [("opening", 0)] if rng.random() < 0.6 else []
        tail = [("shrug", 0)] if rng.random() < 0.5 else []
        return head + [("plot", 0)] * (n - len(head) - len(tail)) + tail
    if label == "mixed":
        if n == 1:
            return [("contrast", 0)]
        head = [("opening", 0)] if n >= 3 and rng.random() < 0.5 else []
        body = [("contrast", 0)]
        p = rng.choice([1, -1])
        while len(head) + len(body) < n:
            body.append(("opinion", p))
            p = -p
        rng.shuffle(body)
        return head + body
    p = 1 if label == "positive" else -1
    if n == 1:
        return [(rng.choice(["opinion", "verdict"]), p)]
    head = [("opening", 0)] if rng.random() < 0.55 else []
    tail = [("verdict", p)] if rng.random() < 0.5 else []
    room = n - len(head) - len(tail)
    plots = rng.randint(0, min(2, max(0, room - 1)))
    opinions = [("opinion", p)] * (room - plots)
    if len(opinions) >= 2 and rng.random() < 0.15:   # a caveat inside a clear verdict
        opinions[-1] = ("opinion", -p)
    return head + [("plot", 0)] * plots + opinions + tail


def generate_review(rng: random.Random) -> Review:
    label = rng.choices(LABELS, LABEL_WEIGHTS)[0]
    n = rng.choices(range(1, 7), LENGTH_WEIGHTS)[0]
    intensity = rng.betavariate(1.3, 1.3)
    title = _title(rng)
    sentences, tids = [], []
    used: set[tuple[str, int]] = set()
    for group, polarity in _plan(label, n, rng):
        index = rng.randrange(len(GROUPS[group]))
        while (group, index) in used:     # no frame twice in one review
            index = rng.randrange(len(GROUPS[group]))
        used.add((group, index))
        # A review does not open with "Still," or "On top of that,".
        text, tid = realise(group, index, _Sentence(polarity, intensity, title), rng, 0.2 if sentences else 0.0)
        sentences.append(text)
        tids.append(tid)
    return Review(" ".join(sentences), label, tuple(tids))


def generate_reviews(n: int, seed: int = 0) -> list[Review]:
    """``n`` reviews, identical for the same seed on every machine (Python's Mersenne Twister)."""
    rng = random.Random(seed)
    return [generate_review(rng) for _ in range(n)]


def word_types(texts: Iterable[str]) -> Counter:
    """Counts of lower-cased alphabetic word types (numbers and punctuation excluded)."""
    counts: Counter = Counter()
    for t in texts:
        counts.update(re.findall(r"[a-z]+(?:[-'][a-z]+)*", t.lower()))
    return counts
