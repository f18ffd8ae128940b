"""The builtin sorting task: gold reward, candidates, splits and the noise ceiling."""

import math
import random

from rlhf.data import builtin_sort as task


def test_gold_score_by_hand():
    assert task.correct_response("31415=") == "11345"
    assert task.gold_score("31415=", "11345") == 1.0
    # 11354 vs 11345: positions 0,1,2 match -> 3/5 -> half credit 0.3
    assert math.isclose(task.gold_score("31415=", "11354"), 0.3)
    # too short: 1134 vs 11345 -> 4 matches over max(4, 5) = 5 -> 0.4
    assert math.isclose(task.gold_score("31415=", "1134"), 0.4)
    assert task.gold_score("31415=", "") == 0.0
    assert task.is_correct("31415=", "11345") and not task.is_correct("31415=", "1134")


def test_near_misses_are_never_correct():
    rng = random.Random(0)
    for _ in range(2000):
        prompt = task.random_prompt(rng, 1, 7)
        miss = task.near_miss(prompt, rng)
        assert not task.is_correct(prompt, miss)
        assert task.gold_score(prompt, miss) <= 0.5


def test_preference_probability_is_bradley_terry():
    # gold 1.0 vs 0.5 at T=0.25: sigmoid(2) = 0.8808
    assert math.isclose(task.preference_probability(1.0, 0.5, 0.25), 1 / (1 + math.exp(-2)))
    assert task.preference_probability(0.3, 0.3, 0.25) == 0.5


def test_noise_ceiling_by_hand():
    pairs = [{"p_chosen": 0.9}, {"p_chosen": 0.2}, {"p_chosen": 0.5}]
    # max(p, 1-p): 0.9, 0.8, 0.5 -> mean 2.2 / 3
    assert math.isclose(task.noise_ceiling(pairs), 2.2 / 3)


def _splits(seed=0):
    return task.generate_splits(seed, 3, 6, 300, 200, 100, 150, 50, 0.4, 0.5, 0.25)


def test_splits_are_deterministic_and_disjoint():
    first, second = _splits(), _splits()
    assert first == second
    assert _splits(seed=1) != first
    prompt_sets = [{row["prompt"] for row in rows} for rows in first.values()]
    for i, a in enumerate(prompt_sets):
        for b in prompt_sets[i + 1:]:
            assert not a & b
    for row in first["preference_train"]:
        assert row["chosen"] != row["rejected"]
        assert 0.0 < row["p_chosen"] < 1.0


def test_demonstrations_are_noisy():
    rows = task.generate_splits(0, 4, 7, 4000, 10, 10, 10, 10, 0.4, 0.5, 0.25)["sft"]
    exact = sum(task.is_correct(r["prompt"], r["completion"]) for r in rows) / len(rows)
    assert 0.35 < exact < 0.45
