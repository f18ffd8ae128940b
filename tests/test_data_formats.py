"""External preference data: sources, formats, validation, leakage, and one tiny pipeline run.

A tiny local model with a character tokenizer over printable ASCII (and a small chat
template) stands in for a real base model, so nothing needs the hub.
"""

from __future__ import annotations

import csv
import json
import string
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf import stages
from rlhf.config import ModelConfig, load_params
from rlhf.data import formats, sources
from rlhf.data.formats import BadRow, ChatRenderer
from rlhf.errors import DataError, ParamsError
from rlhf.paths import Paths
from rlhf.tracking import RecordingLogger

from .conftest import TINY_OVERRIDES

ALPHABET = list(string.printable)
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] == 'assistant' %}"
    "{{ raise_exception('the first message cannot be the assistant') }}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
SPLIT_FILES = ("sft", "preference_train", "preference_eval", "rl_prompts", "eval_prompts")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 with an ASCII character tokenizer that has a chat template."""
    from rlhf.models.builtin import build_tokenizer, save_builtin

    out = tmp_path_factory.mktemp("ascii-model")
    save_builtin(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=256), ALPHABET, out)
    tokenizer = build_tokenizer(ALPHABET)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def render(model_dir) -> ChatRenderer:
    from rlhf.models.loading import load_tokenizer

    return ChatRenderer(load_tokenizer(model_dir), str(model_dir))


def pair(i: int) -> dict:
    return {"prompt": f"Q{i}: {i}+1=", "chosen": f" {i + 1}", "rejected": f" {i + 2}"}


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    """Rows as JSON Lines; `raw_lines` puts literal text at given 1-based line numbers."""
    lines = [json.dumps(row) for row in rows]
    for number, text in sorted((raw_lines or {}).items()):
        lines.insert(number - 1, text)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def prepare(root: Path, source, model_dir: Path, *overrides: str):
    """Run prepare on `source`; return (metrics, manifest, {split: rows})."""
    params = load_params("params.yaml", [f"data.source={source}",
                                         f"model.name_or_path={model_dir}", *overrides])
    logger = RecordingLogger()
    metrics = stages.get("prepare")(params, Paths(root), logger)
    assert logger.metrics == [(None, metrics)]
    prepared = root / "data" / "prepared"
    manifest = json.loads((prepared / "manifest.json").read_text())
    splits = {name: [json.loads(line) for line in (prepared / f"{name}.jsonl").read_text().splitlines()]
              for name in SPLIT_FILES}
    return metrics, manifest, splits


def assert_accounted(manifest: dict) -> None:
    """Nothing lost silently: per split and in total, rows in = kept + held out + dropped."""
    for name, split in manifest["splits"].items():
        assert split["rows_in"] == (split["rows_kept"] + split.get("held_out", 0)
                                    + sum(split["dropped"].values())), name
        assert split["rows_kept"] == manifest["counts"][name]
    assert manifest["rows_in"] == manifest["rows_kept"] + sum(manifest["dropped"].values())


# --- adapters ----------------------------------------------------------------------------

def test_explicit_rows_become_every_split(tmp_path, model_dir):
    source = write_jsonl(tmp_path / "prefs.jsonl", [pair(i) for i in range(40)])
    metrics, manifest, splits = prepare(tmp_path, source, model_dir)
    assert manifest["format"] == "explicit" and manifest["rows_in"] == 40
    assert len(splits["preference_eval"]) == 4 and len(splits["preference_train"]) == 36
    assert splits["sft"] == [{"prompt": r["prompt"], "completion": r["chosen"]}
                             for r in splits["preference_train"]]
    assert splits["rl_prompts"] == [{"prompt": r["prompt"]} for r in splits["preference_train"]]
    assert splits["eval_prompts"] == [{"prompt": r["prompt"]} for r in splits["preference_eval"]]
    train_prompts = {r["prompt"] for r in splits["preference_train"]}
    assert not train_prompts & {r["prompt"] for r in splits["preference_eval"]}
    assert set(splits["preference_train"][0]) == {"prompt", "chosen", "rejected"}
    assert metrics["data/rows_in"] == 40 and metrics["data/rows_kept"] == 40
    assert metrics["data/rows_preference_eval"] == 4
    assert manifest["inputs"]["preference_train"][0]["sha256"]
    assert_accounted(manifest)


def test_hold_out_is_seeded_and_keeps_a_prompts_pairs_together(tmp_path, model_dir):
    rows = [pair(i) for i in range(30)] + [{**pair(i), "rejected": " x"} for i in range(30)]
    source = write_jsonl(tmp_path / "prefs.jsonl", rows)
    _, first, splits = prepare(tmp_path / "a", source, model_dir)
    _, again, _ = prepare(tmp_path / "b", source, model_dir)
    _, other, _ = prepare(tmp_path / "c", source, model_dir, "data.seed=1")
    assert first["sha256"] == again["sha256"]
    assert first["sha256"]["preference_eval"] != other["sha256"]["preference_eval"]
    eval_prompts = [r["prompt"] for r in splits["preference_eval"]]
    assert len(eval_prompts) == 6 and len(set(eval_prompts)) == 3  # both pairs of 3 prompts
    assert first["leakage"] == {"duplicates_removed": 0, "train_eval_overlap_removed": 0}


def test_hh_dialogues_split_at_the_last_assistant_turn(render):
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 5"}
    out, _ = formats.hh(row, render)
    assert out == {"prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant:",
                   "chosen": " 4", "rejected": " 5"}
    with pytest.raises(BadRow) as info:
        formats.hh({"chosen": "\n\nHuman: hi", "rejected": "x\n\nAssistant: y"}, render)
    assert (info.value.reason, info.value.field) == ("malformed", "chosen")
    with pytest.raises(BadRow) as info:
        formats.hh({"chosen": "\n\nHuman: a\n\nAssistant: b",
                    "rejected": "\n\nHuman: c\n\nAssistant: b"}, render)
    assert (info.value.reason, info.value.field) == ("malformed", "rejected")


def test_hh_file_end_to_end(tmp_path, model_dir):
    rows = [{"chosen": f"\n\nHuman: {i}+1?\n\nAssistant: {i + 1}",
             "rejected": f"\n\nHuman: {i}+1?\n\nAssistant: {i + 2}"} for i in range(20)]
    _, manifest, splits = prepare(tmp_path, write_jsonl(tmp_path / "hh.jsonl", rows), model_dir)
    assert manifest["format"] == "hh"
    first = (splits["preference_train"] + splits["preference_eval"])[0]
    assert first["prompt"].endswith("\n\nAssistant:") and first["chosen"].startswith(" ")


def test_conversational_rows_use_the_chat_template(render):
    row = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
           "chosen": [{"role": "assistant", "content": "hello"}],
           "rejected": [{"role": "assistant", "content": "go away"}]}
    out, _ = formats.conversational(row, render)
    assert out == {"prompt": "<system>be brief\n<user>hi\n<assistant>", "chosen": "hello",
                   "rejected": "go away"}
    # `messages` instead of `prompt`, and string responses.
    out, _ = formats.conversational({"messages": [{"role": "user", "content": "hi"}],
                                     "chosen": "hello", "rejected": "bye"}, render)
    assert out == {"prompt": "<user>hi\n<assistant>", "chosen": "hello", "rejected": "bye"}
    # Whole conversations (UltraFeedback style; a string prompt beside them is redundant).
    whole = {"prompt": "hi",
             "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
             "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}
    out, fields = formats.conversational(whole, render)
    assert out == {"prompt": "<user>hi\n<assistant>", "chosen": "yo", "rejected": "no"}
    assert fields["chosen"] == "chosen[1].content"
    # Content given as text parts.
    parts = {"prompt": [{"role": "user", "content": [{"type": "text", "text": "h"},
                                                     {"type": "text", "text": "i"}]}],
             "chosen": "a", "rejected": "b"}
    assert formats.conversational(parts, render)[0]["prompt"] == "<user>hi\n<assistant>"


@pytest.mark.parametrize("row, reason, field", [
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},
     "missing_field", "prompt[0].content"),
    ({"prompt": [{"role": "user", "content": 3}], "chosen": "a", "rejected": "b"},
     "wrong_type", "prompt[0].content"),
    ({"prompt": [{"role": "user", "content": " "}], "chosen": "a", "rejected": "b"},
     "empty", "prompt[0].content"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
     "malformed", "prompt"),  # refused by the chat template
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": "b"}, "malformed", "chosen[0].role"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]},
     "malformed", "rejected"),
])
def test_conversational_bad_rows(render, row, reason, field):
    with pytest.raises(BadRow) as info:
        formats.conversational(row, render)
    assert (info.value.reason, info.value.field) == (reason, field)


def test_conversational_needs_a_chat_template(tmp_path, model_dir):
    from rlhf.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    tokenizer.chat_template = None
    renderer = ChatRenderer(tokenizer, "plain-model")
    with pytest.raises(DataError, match="needs a chat template.*plain-model"):
        formats.conversational({"prompt": [{"role": "user", "content": "hi"}],
                                "chosen": "a", "rejected": "b"}, renderer)


def test_conversational_file_end_to_end(tmp_path, model_dir):
    rows = [{"prompt": [{"role": "user", "content": f"{i}+1?"}],
             "chosen": [{"role": "assistant", "content": str(i + 1)}],
             "rejected": [{"role": "assistant", "content": str(i + 2)}]} for i in range(20)]
    _, manifest, splits = prepare(tmp_path, write_jsonl(tmp_path / "chat.jsonl", rows),
                                  model_dir)
    assert manifest["format"] == "conversational"
    row = splits["preference_train"][0]
    assert row["prompt"].startswith("<user>") and row["prompt"].endswith("<assistant>")


def tldr_row(i: int, choice: int = 0) -> dict:
    return {"info": {"id": str(i), "post": f"post {i}", "title": f"title {i}",
                     "subreddit": "test"},
            "summaries": [{"text": f" summary A{i}", "policy": "a"},
                          {"text": f" summary B{i}", "policy": "b"}],
            "choice": choice, "worker": "w", "batch": "b1", "split": "train"}


def test_tldr_uses_the_n_plus_prompt_and_choice(render):
    out, fields = formats.tldr(tldr_row(1, choice=1), render)
    assert out == {"prompt": "SUBREDDIT: r/test\n\nTITLE: title 1\n\nPOST: post 1\n\nTL;DR:",
                   "chosen": " summary B1", "rejected": " summary A1"}
    assert fields["chosen"] == "summaries[1].text"
    missing = tldr_row(2)
    missing["info"] = {"article": "cnn/dm rows have no post", "title": "t", "subreddit": "s"}
    for row, reason, field in [(missing, "missing_field", "info.post"),
                               ({**tldr_row(3), "choice": 2}, "malformed", "choice"),
                               ({**tldr_row(3), "choice": "0"}, "wrong_type", "choice"),
                               ({**tldr_row(3), "summaries": [{"text": "x"}]}, "malformed",
                                "summaries")]:
        with pytest.raises(BadRow) as info:
            formats.tldr(row, render)
        assert (info.value.reason, info.value.field) == (reason, field)


def test_tldr_file_end_to_end(tmp_path, model_dir):
    rows = [tldr_row(i, i % 2) for i in range(20)]
    _, manifest, splits = prepare(tmp_path, write_jsonl(tmp_path / "tldr.jsonl", rows),
                                  model_dir)
    assert manifest["format"] == "tldr"
    assert all(r["prompt"].endswith("TL;DR:") for r in splits["preference_train"])


def test_sft_source_in_both_forms(tmp_path, model_dir, render):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [pair(i) for i in range(20)])
    plain = write_jsonl(tmp_path / "sft_plain.jsonl",
                        [{"prompt": f"S{i}=", "completion": f" {i}"} for i in range(5)])
    _, manifest, splits = prepare(tmp_path / "a", prefs, model_dir, f"data.sft_source={plain}")
    assert splits["sft"] == [{"prompt": f"S{i}=", "completion": f" {i}"} for i in range(5)]
    assert manifest["splits"]["sft"]["format"] == "prompt_completion"
    chat = write_jsonl(tmp_path / "sft_chat.jsonl", [
        {"messages": [{"role": "user", "content": f"S{i}"},
                      {"role": "assistant", "content": str(i)}]} for i in range(5)])
    _, manifest, splits = prepare(tmp_path / "b", prefs, model_dir, f"data.sft_source={chat}")
    assert splits["sft"][0] == {"prompt": "<user>S0\n<assistant>", "completion": "0"}
    assert manifest["splits"]["sft"]["format"] == "messages"
    assert_accounted(manifest)
    # prompt and completion as messages (TRL's conversational prompt-completion).
    out, _ = formats.sft_prompt_completion(
        {"prompt": [{"role": "user", "content": "P"}],
         "completion": [{"role": "assistant", "content": "C"}]}, render)
    assert out == {"prompt": "<user>P\n<assistant>", "completion": "C"}


def test_sft_messages_must_end_with_the_assistant(render):
    with pytest.raises(BadRow) as info:
        formats.sft_messages({"messages": [{"role": "user", "content": "x"}]}, render)
    assert (info.value.reason, info.value.field) == ("malformed", "messages[0].role")


def test_prompts_source_in_both_forms(tmp_path, model_dir):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [pair(i) for i in range(20)])
    plain = write_jsonl(tmp_path / "p_plain.jsonl", [{"prompt": f"R{i}="} for i in range(6)])
    _, manifest, splits = prepare(tmp_path / "a", prefs, model_dir, f"data.prompts_source={plain}")
    assert splits["rl_prompts"] == [{"prompt": f"R{i}="} for i in range(6)]
    listed = write_jsonl(tmp_path / "p_list.jsonl", [
        {"prompt": [{"role": "user", "content": "A"}]}])
    _, manifest, splits = prepare(tmp_path / "b", prefs, model_dir,
                                  f"data.prompts_source={listed}")
    assert splits["rl_prompts"] == [{"prompt": "<user>A\n<assistant>"}]
    chat = write_jsonl(tmp_path / "p_chat.jsonl", [
        {"messages": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "C"}]}])
    _, manifest, splits = prepare(tmp_path / "c", prefs, model_dir, f"data.prompts_source={chat}")
    assert splits["rl_prompts"] == [{"prompt": "<user>B\n<assistant>"},
                                    {"prompt": "<user>C\n<assistant>"}]
    assert manifest["splits"]["rl_prompts"]["format"] == "messages"
    assert_accounted(manifest)


# --- bad rows ----------------------------------------------------------------------------

BAD_ROWS = [
    # reason, the bad line, the field its error names (None: the row as a whole)
    ("not_json", '{"prompt": "x", "chosen": ', None),
    ("not_json", '["a list"]', None),
    ("missing_field", json.dumps({"prompt": "x", "chosen": "a"}), "rejected"),
    ("missing_field", json.dumps({"prompt": None, "chosen": "a", "rejected": "b"}), "prompt"),
    ("wrong_type", json.dumps({"prompt": "x", "chosen": 3, "rejected": "b"}), "chosen"),
    ("empty", json.dumps({"prompt": "  ", "chosen": "a", "rejected": "b"}), "prompt"),
    ("empty", json.dumps({"prompt": "x", "chosen": "a", "rejected": ""}), "rejected"),
    ("chosen_equals_rejected", json.dumps({"prompt": "x", "chosen": "a", "rejected": "a"}),
     "rejected"),
    ("too_long", json.dumps({"prompt": "x", "chosen": "a", "rejected": "b" * 80}), "rejected"),
]


@pytest.mark.parametrize("reason, line, field", BAD_ROWS)
def test_a_bad_row_stops_the_run_naming_file_row_and_field(tmp_path, model_dir, reason, line,
                                                           field):
    source = write_jsonl(tmp_path / "train.jsonl", [pair(i) for i in range(20)], {17: line})
    with pytest.raises(DataError) as info:
        prepare(tmp_path, source, model_dir, "data.max_length=40")
    message = str(info.value)
    assert message.startswith(f"{source} row 17: ")
    if field:
        assert f"field '{field}'" in message
    assert "data.on_bad_row=drop" in message and "\n" not in message
    assert not (tmp_path / "data" / "prepared").exists()


@pytest.mark.parametrize("reason, line, field", BAD_ROWS)
def test_a_bad_row_is_dropped_and_counted(tmp_path, model_dir, reason, line, field):
    source = write_jsonl(tmp_path / "train.jsonl", [pair(i) for i in range(20)], {17: line})
    metrics, manifest, splits = prepare(tmp_path, source, model_dir, "data.max_length=40",
                                        "data.on_bad_row=drop")
    assert manifest["dropped"] == {reason: 1}
    assert manifest["splits"]["preference_train"]["dropped"] == {reason: 1}
    assert manifest["rows_in"] == 21 and manifest["rows_kept"] == 20
    assert metrics[f"data/dropped/{reason}"] == 1.0 and metrics["data/rows_in"] == 21.0
    assert len(splits["preference_train"]) + len(splits["preference_eval"]) == 20
    assert_accounted(manifest)


def test_malformed_rows_in_both_modes(tmp_path, model_dir):
    rows = [{"chosen": f"\n\nHuman: {i}\n\nAssistant: a", "rejected": f"\n\nHuman: {i}\n\nAssistant: b"}
            for i in range(10)] + [{"chosen": "no turns here", "rejected": "\n\nAssistant: b"}]
    source = write_jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(DataError, match=r"hh.jsonl row 11: field 'chosen' has no "):
        prepare(tmp_path, source, model_dir)
    _, manifest, _ = prepare(tmp_path, source, model_dir, "data.on_bad_row=drop")
    assert manifest["dropped"] == {"malformed": 1}
    assert_accounted(manifest)


def test_too_long_counts_prompt_longest_response_and_eos(tmp_path, model_dir):
    # "Q1: 1+1=" is 8 tokens, " 3" 2, EOS 1: 11 fits max_length 11, not 10.
    source = write_jsonl(tmp_path / "p.jsonl", [pair(1), pair(2)])
    _, manifest, _ = prepare(tmp_path, source, model_dir, "data.max_length=11")
    assert manifest["rows_kept"] == 2
    with pytest.raises(DataError, match=r"field 'chosen' is too long: prompt \+ chosen \+ EOS is 11 tokens, over "
                                        r"data.max_length \(10\)"):
        prepare(tmp_path, source, model_dir, "data.max_length=10")


def test_nothing_left_is_an_error_with_the_counts(tmp_path, model_dir):
    source = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DataError, match=r"no usable rows left for preference_train.*"
                                        r"chosen_equals_rejected"):
        prepare(tmp_path, source, model_dir, "data.on_bad_row=drop")


# --- detection ---------------------------------------------------------------------------

@pytest.mark.parametrize("row, expected", [
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "explicit"),
    ({"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "..."}, "hh"),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b"},
     "conversational"),
    ({"chosen": [{"role": "user", "content": "x"}], "rejected": []}, "conversational"),
    ({"messages": [], "chosen": "a", "rejected": "b"}, "conversational"),
    (tldr_row(0), "tldr"),
])
def test_format_detection(row, expected):
    assert formats.detect_format(row) == expected


def test_undetectable_format_lists_the_columns_and_the_fix():
    with pytest.raises(DataError, match=r"columns \(question, answer\).*set data.format"):
        formats.detect_format({"question": "q", "answer": "a"}, "x.jsonl")
    assert formats.detect_sft_format({"prompt": "p", "completion": "c"}, "x") == "prompt_completion"
    assert formats.detect_sft_format({"messages": []}, "x") == "messages"
    assert formats.detect_sft_format({"prompt": "p", "chosen": "a", "rejected": "b"}, "x") == "explicit"
    assert formats.detect_prompt_format({"prompt": "p"}, "x") == "prompt"
    assert formats.detect_prompt_format({"messages": []}, "x") == "messages"
    assert formats.detect_prompt_format(tldr_row(0), "x") == "tldr"


def test_detection_pools_columns_over_rows(tmp_path, model_dir):
    """A first row missing a field neither misleads detection nor hides the real error."""
    source = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "chosen": "a"}]
                         + [pair(i) for i in range(10)])
    with pytest.raises(DataError, match=r"p.jsonl row 1: field 'rejected' is missing"):
        prepare(tmp_path, source, model_dir)


def test_an_explicit_format_overrides_detection(tmp_path, model_dir):
    source = write_jsonl(tmp_path / "p.jsonl", [pair(i) for i in range(10)])
    with pytest.raises(DataError, match=r"row 1: field 'chosen' has no '\\n\\nAssistant:' turn"):
        prepare(tmp_path, source, model_dir, "data.format=hh")


# --- sources -----------------------------------------------------------------------------

ROWS = [pair(i) for i in range(12)]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "json_object", "json_lines", "parquet",
                                  "csv", "folder"])
def test_every_file_type_reads_the_same_rows(tmp_path, model_dir, kind):
    if kind == "jsonl":
        source = write_jsonl(tmp_path / "p.jsonl", ROWS)
    elif kind == "json":
        source = tmp_path / "p.json"
        source.write_text(json.dumps(ROWS, indent=2))
    elif kind == "json_object":
        source = tmp_path / "p.json"
        source.write_text(json.dumps({"version": 1, "data": ROWS}))
    elif kind == "json_lines":
        source = write_jsonl(tmp_path / "p.json", ROWS)
    elif kind == "parquet":
        source = write_parquet(tmp_path / "p.parquet", ROWS)
    elif kind == "csv":
        source = write_csv(tmp_path / "p.csv", ROWS)
    else:
        source = tmp_path / "folder"
        source.mkdir()
        write_jsonl(source / "part-0.jsonl", ROWS[:5])
        write_parquet(source / "part-1.parquet", ROWS[5:9])
        write_csv(source / "part-2.csv", ROWS[9:])
        (source / "README.md").write_text("not data")
    loaded = sources.load(str(source), "train", None, tmp_path)
    assert [row.data for row in loaded.rows] == ROWS
    assert [row.number for row in loaded.rows][:3] == [1, 2, 3]
    _, manifest, splits = prepare(tmp_path, source, model_dir)
    assert sorted(splits["preference_train"] + splits["preference_eval"],
                  key=lambda r: r["prompt"]) == sorted(ROWS, key=lambda r: r["prompt"])


def test_row_numbers_name_the_file_in_a_folder(tmp_path, model_dir):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", ROWS)
    write_csv(folder / "b.csv", ROWS[:3] + [{"prompt": "x", "chosen": "", "rejected": "b"}])
    with pytest.raises(DataError, match=r"b.csv row 4: field 'chosen' is empty"):
        prepare(tmp_path, folder, model_dir)


def test_folder_splits_by_file_name_or_subfolder(tmp_path, model_dir):
    folder = tmp_path / "ds"
    (folder / "test").mkdir(parents=True)
    write_jsonl(folder / "train-00000-of-00001.jsonl", ROWS[:8])
    write_parquet(folder / "test" / "0.parquet", ROWS[8:])
    _, manifest, splits = prepare(tmp_path, folder, model_dir, "data.eval_split=test")
    assert splits["preference_train"] == ROWS[:8] and splits["preference_eval"] == ROWS[8:]
    assert "held_out" not in manifest["splits"]["preference_train"]
    with pytest.raises(DataError, match=r"no files for split 'validation'"):
        prepare(tmp_path, folder, model_dir, "data.eval_split=validation")


def test_eval_split_needs_a_folder_or_the_hub(tmp_path, model_dir):
    source = write_jsonl(tmp_path / "p.jsonl", ROWS)
    with pytest.raises(DataError, match=r"data.eval_split \('test'\) needs a folder"):
        prepare(tmp_path, source, model_dir, "data.eval_split=test")


def test_max_rows_reads_only_the_first_rows(tmp_path, model_dir):
    source = write_jsonl(tmp_path / "p.jsonl", ROWS)
    _, manifest, _ = prepare(tmp_path, source, model_dir, "data.max_rows=10")
    assert manifest["rows_in"] == 10
    assert manifest["max_rows"] == {"limit": 10, "truncated": ["preference_train"]}


def test_a_missing_local_path_names_the_path_and_the_fix(tmp_path, model_dir):
    with pytest.raises(DataError, match=r"data source 'data/nope.jsonl' not found \(looked for "
                                        r".*data/nope.jsonl\); check the path"):
        prepare(tmp_path, "data/nope.jsonl", model_dir)


def test_external_data_needs_a_real_tokenizer(tmp_path):
    source = write_jsonl(tmp_path / "p.jsonl", ROWS)
    params = load_params("params.yaml", [f"data.source={source}"])
    with pytest.raises(DataError, match="set model.name_or_path"):
        stages.get("prepare")(params, Paths(tmp_path))


def write_hub_dir(root: Path) -> Path:
    """A dataset folder laid out like a hub repository: a README with two configurations."""
    for config in ("pairs", "other"):
        for split, rows in (("train", ROWS[:9]), ("test", ROWS[9:])):
            (root / config).mkdir(parents=True, exist_ok=True)
            write_jsonl(root / config / f"{split}.jsonl",
                        rows if config == "pairs" else [{"question": "q"}])
    configs = "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.jsonl\n"
        f"  - split: test\n    path: {c}/test.jsonl\n" for c in ("pairs", "other"))
    (root / "README.md").write_text(f"---\nconfigs:\n{configs}---\n# test data\n")
    return root


def test_hub_loader_goes_through_datasets_load_dataset(tmp_path):
    hub = write_hub_dir(tmp_path / "hub")
    loaded = sources.load_hub(str(hub), "pairs", "test")
    assert [row.data for row in loaded.rows] == ROWS[9:]
    assert loaded.rows[0].where == f"{hub} (pairs) split test row 1"
    assert loaded.inputs[0]["fingerprint"]
    assert sources.load_hub(str(hub), "pairs", "train", max_rows=4).truncated


def test_prepare_from_a_hub_id(tmp_path, model_dir, monkeypatch):
    """A hub id is passed to datasets.load_dataset with its subset and splits."""
    import datasets

    hub = write_hub_dir(tmp_path / "hub")
    real, calls = datasets.load_dataset, []

    def fake_hub(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        assert path == "some-org/prefs"
        return real(str(hub), name, split=split, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    _, manifest, splits = prepare(tmp_path, "some-org/prefs", model_dir, "data.subset=pairs",
                                  "data.eval_split=test")
    assert calls == [("some-org/prefs", "pairs", "train"), ("some-org/prefs", "pairs", "test")]
    assert splits["preference_train"] == ROWS[:9] and splits["preference_eval"] == ROWS[9:]
    assert manifest["splits"]["preference_train"]["from"] == "some-org/prefs (pairs) split train"
    assert manifest["inputs"]["preference_eval"][0]["dataset"] == "some-org/prefs"


def test_a_hub_failure_is_one_line(tmp_path, model_dir, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'some-org/prefs' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        prepare(tmp_path, "some-org/prefs", model_dir)
    assert "is not a local path and the hub could not load it" in str(info.value)
    assert "\n" not in str(info.value)


# --- leakage -----------------------------------------------------------------------------

def test_duplicates_and_train_eval_overlap_are_removed_and_counted(tmp_path, model_dir):
    folder = tmp_path / "ds"
    folder.mkdir()
    train = ROWS[:8] + [ROWS[0], ROWS[1]] + [{**ROWS[9], "rejected": " other"}]
    write_jsonl(folder / "train.jsonl", train)   # 2 exact duplicates, 1 eval prompt
    write_jsonl(folder / "test.jsonl", ROWS[8:] + [ROWS[8]])  # 1 duplicate
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": ROWS[10]["prompt"], "completion": "x"},
                                               {"prompt": "fresh", "completion": "y"}])
    prompts = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": ROWS[11]["prompt"]},
                                                  {"prompt": "new"}, {"prompt": "new"}])
    metrics, manifest, splits = prepare(tmp_path, folder, model_dir, "data.eval_split=test",
                                        f"data.sft_source={sft}", f"data.prompts_source={prompts}")
    assert splits["preference_train"] == ROWS[:8]
    assert splits["preference_eval"] == ROWS[8:]
    assert splits["sft"] == [{"prompt": "fresh", "completion": "y"}]
    assert splits["rl_prompts"] == [{"prompt": "new"}]
    assert manifest["splits"]["preference_train"]["dropped"] == {"duplicate": 2,
                                                                 "train_eval_overlap": 1}
    assert manifest["splits"]["preference_eval"]["dropped"] == {"duplicate": 1}
    assert manifest["splits"]["sft"]["dropped"] == {"train_eval_overlap": 1}
    assert manifest["splits"]["rl_prompts"]["dropped"] == {"duplicate": 1,
                                                           "train_eval_overlap": 1}
    assert manifest["leakage"] == {"duplicates_removed": 4, "train_eval_overlap_removed": 3}
    assert metrics["data/leakage/train_eval_overlap_removed"] == 3.0
    assert manifest["rows_in"] == 11 + 5 + 2 + 3
    assert_accounted(manifest)


def test_rl_prompts_from_pairs_are_unique(tmp_path, model_dir):
    rows = [pair(i) for i in range(10)] + [{**pair(i), "chosen": " z"} for i in range(10)]
    _, manifest, splits = prepare(tmp_path, write_jsonl(tmp_path / "p.jsonl", rows), model_dir)
    prompts = [r["prompt"] for r in splits["rl_prompts"]]
    assert len(prompts) == len(set(prompts)) == 9
    assert manifest["splits"]["rl_prompts"]["dropped"] == {"duplicate": 9}
    assert len(splits["sft"]) == 18  # two pairs per prompt: both chosen responses kept
    assert_accounted(manifest)


# --- params ------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, expected", [
    (["data.format=yaml"], "'auto', 'explicit', 'hh', 'conversational' or 'tldr'"),
    (["data.on_bad_row=skip"], "'error' or 'drop'"),
    (["data.eval_fraction=1.0"], "less than 1"),
    (["data.max_rows=0"], "greater than or equal to 1"),
    (["data.sft_source=x.jsonl"], "data.sft_source applies to external data only"),
    (["data.source=x.jsonl", "data.eval_split=train"], "must differ from data.split"),
])
def test_data_params_are_validated(overrides, expected):
    with pytest.raises(ParamsError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_params("params.yaml", overrides)


def test_cli_reports_a_bad_row_in_one_line(tmp_path, model_dir):
    source = write_jsonl(tmp_path / "p.jsonl", ROWS, {3: '{"prompt": "x"}'})
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "stage", "prepare", "--no-track", "--root",
         str(tmp_path), "--set", f"data.source={source}", "--set",
         f"model.name_or_path={model_dir}"],
        capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{source} row 3: field 'chosen' is missing" in lines[0]


# --- the whole pipeline on external data -------------------------------------------------

def test_pipeline_runs_end_to_end_on_an_explicit_jsonl(tmp_path, model_dir):
    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
            for a in range(10) for b in range(10)]
    source = write_jsonl(tmp_path / "sums.jsonl", rows)
    params = load_params("params.yaml", TINY_OVERRIDES + [
        f"data.source={source}", f"model.name_or_path={model_dir}"])
    paths = Paths(tmp_path / "project")
    results = {name: stages.get(name)(params, paths) for name in stages.COMPUTE_STAGES}
    assert results["prepare"]["data/rows_kept"] == 100
    assert results["sft"]["sft/loss_final"] < results["sft"]["sft/loss_first"]
    assert "reward/accuracy" in results["reward"]
    report = json.loads(paths.metrics_file("eval").read_text())
    assert report["n_prompts"] == 10
    assert {"rm_score", "kl"} <= set(report["policy"]) and "gold_reward" not in report["policy"]
    assert (paths.policy / "model.safetensors").exists()
