"""SimulatedAnnotator: agreement with gold, Bradley-Terry rates, ties and determinism."""

import math
import random

import pytest

from rlhf.world import SimulatedAnnotator, reviews

P = "<review> product: red kettle"
M = {"product": "kettle", "color": "red"}
BEST = " the kettle is excellent . i love the lid . the handle is very great ."
WORSE = " the kettle is okay ."


def _pairs(n, seed=0):
    rng = random.Random(seed)
    return [(reviews.write_review(rng, "kettle", reviews.DEMO), reviews.write_review(rng, "kettle", reviews.DEMO))
            for _ in range(n)]


def test_zero_temperature_agrees_with_gold():
    ann = SimulatedAnnotator(temperature=0.0, seed=0)
    for a, b in _pairs(300):
        ga, gb = reviews.gold_score("kettle", a), reviews.gold_score("kettle", b)
        expected = 1.0 if ga > gb else 0.0 if ga < gb else 0.5
        assert ann.judge("review", P, a, b, M) == expected


def test_bradley_terry_rate_matches_sigmoid():
    temperature = 0.5
    ann = SimulatedAnnotator(temperature=temperature, seed=1)
    diff = reviews.gold_score("kettle", BEST) - reviews.gold_score("kettle", WORSE)
    n = 4000
    rate = sum(ann.judge("review", P, BEST, WORSE, M) for _ in range(n)) / n
    expected = 1 / (1 + math.exp(-diff / temperature))
    assert rate == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / n))


def test_tie_rate_is_respected():
    ann = SimulatedAnnotator(temperature=0.5, tie_rate=0.3, seed=2)
    n = 4000
    ties = sum(ann.judge("review", P, BEST, WORSE, M) == 0.5 for _ in range(n)) / n
    assert ties == pytest.approx(0.3, abs=0.03)


def test_deterministic_given_seed_and_call_order():
    pairs = _pairs(50, seed=3)
    runs = []
    for _ in range(2):
        ann = SimulatedAnnotator(temperature=1.0, tie_rate=0.1, seed=7)
        runs.append([ann.judge("review", P, a, b, M) for a, b in pairs])
    assert runs[0] == runs[1]
    other = SimulatedAnnotator(temperature=1.0, tie_rate=0.1, seed=8)
    assert [other.judge("review", P, a, b, M) for a, b in pairs] != runs[0]


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError):
        SimulatedAnnotator(temperature=-1)
    with pytest.raises(ValueError):
        SimulatedAnnotator(tie_rate=1.5)
