"""The builtin task: sort a short list of digits, with a known gold reward.

A prompt is the digits followed by `=`, e.g. `31415=`; the right response is the digits in
ascending order, `11345`, then EOS. The gold score gives full credit for the exact sort and
up to half credit for a near miss (the fraction of positions that match), so a policy can
climb by partial credit but the top is only reached by sorting exactly.

Noisy candidates stand in for human writers: with some probability a candidate is the exact
sort, otherwise one of a few typical mistakes. SFT demonstrations are drawn from them, so
the SFT policy imitates the mistakes too; preference labels come from simulated raters who
prefer the better candidate with Bradley-Terry probability on the gold scores, so the labels
are noisy and the best any reward model can do on them (the noise ceiling) is known exactly.
"""

from __future__ import annotations

import math
import random
from typing import Iterator

PROMPT_SUFFIX = "="
MISTAKES = ("swap", "replace", "drop", "duplicate", "partial")


def make_prompt(digits: list[int]) -> str:
    return "".join(map(str, digits)) + PROMPT_SUFFIX


def prompt_digits(prompt: str) -> list[int]:
    return [int(ch) for ch in prompt.removesuffix(PROMPT_SUFFIX)]


def correct_response(prompt: str) -> str:
    return "".join(sorted(prompt.removesuffix(PROMPT_SUFFIX)))


def gold_score(prompt: str, response: str) -> float:
    """1.0 for the exact sort; else half the fraction of positions that match the sort."""
    target = correct_response(prompt)
    response = response.strip()
    if response == target:
        return 1.0
    matches = sum(a == b for a, b in zip(response, target))
    return 0.5 * matches / max(len(response), len(target))


def is_correct(prompt: str, response: str) -> bool:
    return response.strip() == correct_response(prompt)


def random_prompt(rng: random.Random, min_digits: int, max_digits: int) -> str:
    n = rng.randint(min_digits, max_digits)
    return make_prompt([rng.randrange(10) for _ in range(n)])


def near_miss(prompt: str, rng: random.Random) -> str:
    """One typical mistake applied to the exact sort (never the exact sort itself)."""
    target = list(correct_response(prompt))
    for _ in range(20):
        out = list(target)
        mistake = rng.choice(MISTAKES)
        i = rng.randrange(len(out))
        if mistake == "swap" and len(out) > 1:
            j = min(i + 1, len(out) - 1) if i + 1 < len(out) else i - 1
            out[i], out[j] = out[j], out[i]
        elif mistake == "replace":
            out[i] = str(rng.randrange(10))
        elif mistake == "drop" and len(out) > 1:
            del out[i]
        elif mistake == "duplicate":
            out.insert(i, out[i])
        elif mistake == "partial":
            # Sorted only up to a point, the rest left in prompt order.
            original = list(prompt.removesuffix(PROMPT_SUFFIX))
            out = sorted(original[: i + 1]) + original[i + 1 :]
        candidate = "".join(out)
        if candidate != "".join(target):
            return candidate
    # Lists such as `1111` have few distinct mistakes; appending a digit always differs.
    return "".join(target) + str(rng.randrange(10))


def noisy_candidate(prompt: str, rng: random.Random, correct_prob: float) -> str:
    if rng.random() < correct_prob:
        return correct_response(prompt)
    return near_miss(prompt, rng)


def preference_probability(gold_a: float, gold_b: float, temperature: float) -> float:
    """P(a preferred over b) under Bradley-Terry on the gold scores."""
    return 1.0 / (1.0 + math.exp(-(gold_a - gold_b) / temperature))


def unique_prompts(rng: random.Random, count: int, min_digits: int, max_digits: int,
                   taken: set[str]) -> Iterator[str]:
    """`count` prompts not in `taken` (which is updated), so splits stay disjoint."""
    produced = 0
    attempts = 0
    while produced < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(
                f"only {produced} distinct prompts of {min_digits}-{max_digits} digits are left; "
                "ask for fewer rows or widen data.min_digits/data.max_digits"
            )
        prompt = random_prompt(rng, min_digits, max_digits)
        if prompt in taken:
            continue
        taken.add(prompt)
        produced += 1
        yield prompt


def preference_pair(prompt: str, rng: random.Random, correct_prob: float,
                    temperature: float) -> dict:
    """Two distinct candidates, labelled by a simulated Bradley-Terry rater."""
    a = noisy_candidate(prompt, rng, correct_prob)
    b = noisy_candidate(prompt, rng, correct_prob)
    while b == a:
        b = near_miss(prompt, rng)
    gold_a, gold_b = gold_score(prompt, a), gold_score(prompt, b)
    p_a = preference_probability(gold_a, gold_b, temperature)
    a_wins = rng.random() < p_a
    chosen, rejected = (a, b) if a_wins else (b, a)
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "gold_chosen": gold_score(prompt, chosen),
        "gold_rejected": gold_score(prompt, rejected),
        # Probability a rater prefers `chosen`: max(p, 1-p) is the best any model can score.
        "p_chosen": p_a if a_wins else 1.0 - p_a,
    }


def generate_splits(seed: int, min_digits: int, max_digits: int, n_sft: int, n_pairs: int,
                    n_pairs_eval: int, n_rl_prompts: int, n_eval_prompts: int,
                    demo_correct_prob: float, candidate_correct_prob: float,
                    label_temperature: float) -> dict[str, list[dict]]:
    """All splits of the builtin task. Prompts are disjoint across splits."""
    rng = random.Random(seed)
    taken: set[str] = set()

    def prompts(count: int) -> list[str]:
        return list(unique_prompts(rng, count, min_digits, max_digits, taken))

    sft = [{"prompt": p, "completion": noisy_candidate(p, rng, demo_correct_prob)}
           for p in prompts(n_sft)]
    pairs = [preference_pair(p, rng, candidate_correct_prob, label_temperature)
             for p in prompts(n_pairs)]
    pairs_eval = [preference_pair(p, rng, candidate_correct_prob, label_temperature)
                  for p in prompts(n_pairs_eval)]
    rl_prompts = [{"prompt": p} for p in prompts(n_rl_prompts)]
    eval_prompts = [{"prompt": p} for p in prompts(n_eval_prompts)]
    return {
        "sft": sft,
        "preference_train": pairs,
        "preference_eval": pairs_eval,
        "rl_prompts": rl_prompts,
        "eval_prompts": eval_prompts,
    }


def noise_ceiling(pairs: list[dict]) -> float:
    """E[max(p, 1-p)] over the pairs: the best expected accuracy on their noisy labels."""
    return sum(max(row["p_chosen"], 1.0 - row["p_chosen"]) for row in pairs) / len(pairs)


# Every character the task's text can contain; the builtin tokenizer's vocabulary.
ALPHABET = list("0123456789") + [PROMPT_SUFFIX]
