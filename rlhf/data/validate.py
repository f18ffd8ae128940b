"""Row validation, deduplication and leakage removal, with an account of every row.

Each output split keeps a `SplitReport`: rows in, rows kept, rows held out (moved to the
eval split) and rows dropped per reason. `SplitReport.check` enforces
`rows_in == rows_kept + held_out + sum(dropped)` so no row is ever lost silently.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from rlhf.data.formats import REASONS, BadRow, ChatRenderer, Fields
from rlhf.data.sources import RawRow
from rlhf.errors import DataError

RESPONSES = {"pair": ("chosen", "rejected"), "sft": ("completion",), "prompt": ()}
KEYS = {"pair": ("prompt", "chosen", "rejected"), "sft": ("prompt", "completion"),
        "prompt": ("prompt",)}
FIXES = {
    "too_long": "shorten the row, raise data.max_length or set data.on_bad_row=drop",
}
DEFAULT_FIX = "fix the row or set data.on_bad_row=drop"


@dataclass
class SplitReport:
    """Where a split's rows came from and what happened to each of them."""

    origin: str
    format: str
    rows_in: int = 0
    rows_kept: int = 0
    held_out: int = 0
    dropped: Counter = field(default_factory=Counter)

    def drop(self, reason: str, count: int = 1) -> None:
        assert reason in REASONS, reason
        if count:
            self.dropped[reason] += count

    def finish(self, rows_kept: int) -> "SplitReport":
        self.rows_kept = rows_kept
        self.check()
        return self

    def check(self) -> None:
        accounted = self.rows_kept + self.held_out + sum(self.dropped.values())
        if accounted != self.rows_in:  # a bug, never a user error: fail loudly even under -O
            raise AssertionError(
                f"row accounting of {self.origin}: {self.rows_in} in but {self.rows_kept} kept "
                f"+ {self.held_out} held out + {dict(self.dropped)} dropped = {accounted}")

    def as_dict(self) -> dict:
        out = {"from": self.origin, "format": self.format, "rows_in": self.rows_in,
               "rows_kept": self.rows_kept, "dropped": dict(sorted(self.dropped.items()))}
        if self.held_out:
            out["held_out"] = self.held_out
        return out


@dataclass
class Item:
    """A canonical row, with where it came from and its raw field names (for messages)."""

    row: dict
    where: str
    fields: Fields


def token_lengths(tokenizer, texts: list[str], batch_size: int = 1024) -> list[int]:
    """Token counts exactly as the stages encode text (no special tokens added)."""
    lengths: list[int] = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], add_special_tokens=False)
        lengths += [len(ids) for ids in encoded["input_ids"]]
    return lengths


def max_chars_per_token(tokenizer) -> int:
    """The most characters one token can stand for: its longest vocabulary entry (byte-level
    BPE entries have one character per byte, SentencePiece's '▁' stands for one space, byte
    fallback and WordPiece '##' entries cover fewer characters than they have). So a text of
    more than max_length * this many characters cannot fit in max_length tokens."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1) or 1


def normalise_prompt(text: str) -> str:
    """A prompt as leakage checks compare it: runs of whitespace made one space, ends stripped
    (a copy of an eval prompt with a trailing newline or doubled space is still that prompt)."""
    return " ".join(text.split())


def _content_problem(row: dict, kind: str, fields: Fields) -> Optional[BadRow]:
    for key in KEYS[kind]:
        if not row[key].strip():
            return BadRow("empty", fields.get(key, key), "is empty")
    if kind == "pair" and row["chosen"].strip() == row["rejected"].strip():
        return BadRow("chosen_equals_rejected", fields.get("rejected", "rejected"),
                      f"is the same as '{fields.get('chosen', 'chosen')}'")
    return None


def adapt(rows: Iterable[RawRow], adapter: Callable[[dict, ChatRenderer], tuple[dict, Fields]],
          render: ChatRenderer, kind: str, tokenizer, max_length: int, on_bad_row: str,
          report: SplitReport) -> list[Item]:
    """Canonical rows of the good raw rows. A bad row stops the run with one line naming its
    file, row and field (`on_bad_row=error`) or is dropped and counted by reason (`drop`).
    Rows are judged in order, so the error names the first bad row."""
    candidates: list[tuple[RawRow, object]] = []
    for raw in rows:
        report.rows_in += 1
        if raw.error is not None:
            candidates.append((raw, BadRow("not_json", None, raw.error)))
            continue
        try:
            row, fields = adapter(raw.data, render)
            problem = _content_problem(row, kind, fields)
            candidates.append((raw, problem or Item(row, raw.where, fields)))
        except BadRow as bad:
            candidates.append((raw, bad))

    # A row too long in characters for any tokenization to fit is rejected before it is
    # tokenized: one 20 MB row would otherwise take a minute and gigabytes to count.
    limit = max_length * max_chars_per_token(tokenizer)
    for j, (raw, outcome) in enumerate(candidates):
        if not isinstance(outcome, Item):
            continue
        longest = max(RESPONSES[kind], key=lambda k: len(outcome.row[k]), default=None)
        chars = len(outcome.row["prompt"]) + (len(outcome.row[longest]) if longest else 0)
        if chars > limit:
            what = f"prompt + {longest}" if longest else "prompt"
            name = max(("prompt", *([longest] if longest else [])),
                       key=lambda k: len(outcome.row[k]))  # the field to shorten
            candidates[j] = (raw, BadRow(
                "too_long", outcome.fields.get(name, name),
                f"is too long: {what} is {chars} characters, more than data.max_length "
                f"({max_length}) tokens can hold"))

    positions = [j for j, (_, outcome) in enumerate(candidates) if isinstance(outcome, Item)]
    good: list[Item] = [candidates[j][1] for j in positions]  # type: ignore[misc]
    prompt_lengths = token_lengths(tokenizer, [item.row["prompt"] for item in good])
    response_lengths = {key: token_lengths(tokenizer, [item.row[key] for item in good])
                        for key in RESPONSES[kind]}
    for i, item in enumerate(good):
        longest = max(RESPONSES[kind], key=lambda k: response_lengths[k][i], default=None)
        total = prompt_lengths[i] + (response_lengths[longest][i] + 1 if longest else 0)
        if total > max_length:
            name = longest or "prompt"
            what = f"prompt + {name} + EOS" if longest else "prompt"
            index = positions[i]
            candidates[index] = (candidates[index][0], BadRow(
                "too_long", item.fields.get(name, name),
                f"is too long: {what} is {total} tokens, over data.max_length ({max_length})"))

    kept = []
    for raw, outcome in candidates:
        if isinstance(outcome, Item):
            kept.append(outcome)
            continue
        assert isinstance(outcome, BadRow)
        if on_bad_row == "error":
            raise DataError(f"{raw.where}: {outcome.describe()}; "
                            f"{FIXES.get(outcome.reason, DEFAULT_FIX)}")
        report.drop(outcome.reason)
    return kept


def dedupe(items: list[Item], kind: str, report: SplitReport) -> list[Item]:
    """Duplicates removed (the first kept): same prompt (up to whitespace) in a prompt split,
    the same whole row in a pair or SFT split (several pairs per prompt are normal and kept)."""
    seen: set[tuple] = set()
    out = []
    for item in items:
        key = tuple(normalise_prompt(item.row[k]) if k == "prompt" else item.row[k]
                    for k in KEYS[kind])
        if key in seen:
            report.drop("duplicate")
            continue
        seen.add(key)
        out.append(item)
    return out


def remove_prompts(items: list[Item], prompts: set[str], report: SplitReport) -> list[Item]:
    """Training rows whose prompt is an evaluation prompt (up to whitespace) are removed
    (train/eval leakage)."""
    prompts = {normalise_prompt(p) for p in prompts}
    out = [item for item in items if normalise_prompt(item.row["prompt"]) not in prompts]
    report.drop("train_eval_overlap", len(items) - len(out))
    return out


def hold_out(items: list[Item], fraction: float, seed: int, report: SplitReport,
             origin: str) -> tuple[list[Item], list[Item]]:
    """Split by prompt, up to whitespace (all pairs of a prompt land on the same side): a
    seeded shuffle of the distinct prompts, `fraction` of them (at least one) held out. Row
    order is kept."""
    prompts = list(dict.fromkeys(normalise_prompt(item.row["prompt"]) for item in items))
    if len(prompts) < 2:
        raise DataError(
            f"{origin} has {len(prompts)} distinct usable prompt(s); at least 2 are needed to "
            "hold out an eval split; add rows or set data.eval_split"
        )
    n_eval = min(max(1, round(fraction * len(prompts))), len(prompts) - 1)
    shuffled = list(prompts)
    random.Random(seed).shuffle(shuffled)
    held = set(shuffled[:n_eval])
    train = [item for item in items if normalise_prompt(item.row["prompt"]) not in held]
    evals = [item for item in items if normalise_prompt(item.row["prompt"]) in held]
    report.held_out += len(evals)
    return train, evals
