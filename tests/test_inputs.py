"""Bad inputs stop with one line or are counted: non-UTF-8 bytes in json and csv sources, a
huge row (rejected by its size before tokenizing), prompts that differ only in whitespace,
bad params files and values, and a tokenizer whose pad token the model cannot embed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf import stages
from rlhf.config import load_params
from rlhf.errors import DataError, ParamsError
from rlhf.paths import Paths

from .conftest import REPO, TINY_OVERRIDES, prefect_home
from .test_data_formats import assert_accounted, model_dir, pair, prepare, write_jsonl  # noqa: F401

BAD_BYTES = b"caf\xe9 \xff"  # Latin-1, not UTF-8


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)})


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# --- non-UTF-8 bytes ---------------------------------------------------------------------

def json_array_with_bad_row(path: Path, rows: list[dict], bad: int) -> Path:
    """A JSON array of rows whose row `bad` (1-based) has Latin-1 bytes in its prompt."""
    parts = [json.dumps(row).encode() for row in rows]
    parts[bad - 1] = parts[bad - 1].replace(b'"Q', b'"' + BAD_BYTES + b' Q', 1)
    path.write_bytes(b"[\n" + b",\n".join(parts) + b"\n]\n")
    return path


def csv_with_bad_row(path: Path, rows: list[dict], bad: int) -> Path:
    lines = [b"prompt,chosen,rejected"] + [
        f'"{r["prompt"]}","{r["chosen"]}","{r["rejected"]}"'.encode() for r in rows]
    lines[bad] = lines[bad].replace(b'"Q', b'"' + BAD_BYTES + b" Q", 1)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("kind", ["json", "csv"])
def test_non_utf8_bytes_name_the_row_or_are_counted(tmp_path, model_dir, kind):
    rows = [pair(i) for i in range(20)]
    write = json_array_with_bad_row if kind == "json" else csv_with_bad_row
    source = write(tmp_path / f"prefs.{kind}", rows, bad=7)
    with pytest.raises(DataError, match=rf"^{source} row 7: not UTF-8 text; fix the row or set "
                                        r"data.on_bad_row=drop$"):
        prepare(tmp_path / "a", source, model_dir)
    _, manifest, splits = prepare(tmp_path / "b", source, model_dir, "data.on_bad_row=drop")
    assert manifest["dropped"] == {"not_json": 1} and manifest["rows_kept"] == 19
    kept = splits["preference_train"] + splits["preference_eval"]
    assert sorted(r["prompt"] for r in kept) == sorted(r["prompt"] for r in rows[:6] + rows[7:])
    assert_accounted(manifest)


def test_a_non_utf8_csv_header_is_one_line(tmp_path, model_dir):
    source = tmp_path / "prefs.csv"
    source.write_bytes(b"prompt\xe9,chosen,rejected\nQ,a,b\n")
    with pytest.raises(DataError, match=rf"^{source} line 1: the header is not UTF-8 text"):
        prepare(tmp_path, source, model_dir)


def test_the_cli_reports_a_non_utf8_json_row_in_one_line(tmp_path, model_dir):
    source = json_array_with_bad_row(tmp_path / "p.json", [pair(i) for i in range(20)], bad=3)
    line = one_line(cli("stage", "prepare", "--no-track", "--root", str(tmp_path), "--set",
                        f"data.source={source}", "--set", f"model.name_or_path={model_dir}"))
    assert f"{source} row 3: not UTF-8 text" in line


# --- huge rows ---------------------------------------------------------------------------

def test_a_row_too_long_in_characters_is_rejected_before_tokenizing(tmp_path, model_dir):
    """The ASCII model's longest token is 5 characters ('<pad>'), so with max_length 40 no
    text over 200 characters can fit: such a row gets the character count, not a token count
    (it was never tokenized). A shorter row over the limit still gets its token count."""
    rows = [pair(i) for i in range(20)]
    huge = write_jsonl(tmp_path / "huge.jsonl", rows, {5: json.dumps(
        {"prompt": "x", "chosen": "a", "rejected": "b" * 300})})
    with pytest.raises(DataError, match=rf"^{huge} row 5: field 'rejected' is too long: prompt "
                                        r"\+ rejected is 301 characters, more than "
                                        r"data.max_length \(40\) tokens can hold; shorten"):
        prepare(tmp_path / "a", huge, model_dir, "data.max_length=40")
    long = write_jsonl(tmp_path / "long.jsonl", rows, {5: json.dumps(
        {"prompt": "x", "chosen": "a", "rejected": "b" * 150})})
    with pytest.raises(DataError, match=r"row 5: field 'rejected' is too long: prompt \+ "
                                        r"rejected \+ EOS is 152 tokens"):
        prepare(tmp_path / "b", long, model_dir, "data.max_length=40")
    _, manifest, _ = prepare(tmp_path / "c", huge, model_dir, "data.max_length=40",
                             "data.on_bad_row=drop")
    assert manifest["dropped"] == {"too_long": 1}


def test_a_20_mb_row_costs_no_more_memory_than_reading_it(tmp_path, model_dir):
    """One 20 MB row (it took 55 s and 8 GB to tokenize) is rejected by its size: the whole
    prepare process stays under 1.5 GB at its peak."""
    source = write_jsonl(tmp_path / "p.jsonl", [pair(i) for i in range(20)], {2: json.dumps(
        {"prompt": "Q: " + "lorem ipsum " * 1_750_000, "chosen": "a", "rejected": "b"})})
    assert source.stat().st_size > 20_000_000
    with open(tmp_path / "stderr", "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "rlhf.cli", "stage", "prepare", "--no-track", "--root",
             str(tmp_path), "--set", f"data.source={source}", "--set",
             f"model.name_or_path={model_dir}"],
            stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory
    result = subprocess.CompletedProcess(process.args, os.waitstatus_to_exitcode(status), "",
                                         (tmp_path / "stderr").read_text())
    assert usage.ru_maxrss < 1_500_000, f"peak {usage.ru_maxrss} kB"  # kB on Linux
    line = one_line(result)
    assert f"{source} row 2: field 'prompt' is too long: prompt + chosen is" in line
    assert "characters" in line


def test_leakage_checks_normalise_whitespace(tmp_path, model_dir):
    folder = tmp_path / "ds"
    folder.mkdir()
    evals = [pair(i) for i in range(20, 24)]
    respaced = {**pair(20), "prompt": "  Q20:\t20+1=\n", "chosen": " 99"}
    write_jsonl(folder / "train.jsonl", [pair(i) for i in range(8)] + [respaced])
    write_jsonl(folder / "test.jsonl", evals)
    prompts = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "a  b"}, {"prompt": "a b\n"},
                                                  {"prompt": " Q21:  21+1="}])
    _, manifest, splits = prepare(tmp_path / "a", folder, model_dir, "data.eval_split=test",
                                  f"data.prompts_source={prompts}")
    assert splits["preference_train"] == [pair(i) for i in range(8)]
    assert splits["rl_prompts"] == [{"prompt": "a  b"}]
    assert manifest["leakage"] == {"duplicates_removed": 1, "train_eval_overlap_removed": 2}
    assert_accounted(manifest)

    # Held out by prompt: pairs whose prompts differ only in whitespace stay on one side.
    rows = [pair(i) for i in range(20)] + [{**pair(i), "prompt": pair(i)["prompt"] + "  ",
                                            "rejected": " x"} for i in range(20)]
    _, manifest, splits = prepare(tmp_path / "b", write_jsonl(tmp_path / "p.jsonl", rows),
                                  model_dir)
    held = {" ".join(r["prompt"].split()) for r in splits["preference_eval"]}
    train = {" ".join(r["prompt"].split()) for r in splits["preference_train"]}
    assert held and not held & train
    assert len(splits["preference_eval"]) == 2 * len(held)


# --- params ------------------------------------------------------------------------------

@pytest.mark.parametrize("override, expected", [
    ("ppo.lr=inf", "ppo.lr = 'inf' is not allowed: Input should be a finite number"),
    ("ppo.lr=.nan", "ppo.lr = nan is not allowed: Input should be a finite number"),
    ("ppo.missing_eos_penalty=-.inf", "Input should be a finite number"),
    ("ppo.steps=true", "ppo.steps = True is not allowed: Input should be an integer, not a "
                       "boolean"),
    ("sft.epochs=false", "sft.epochs = False is not allowed: Input should be a number"),
    ("data.max_rows=true", "Input should be an integer or null, not a boolean"),
    ("registry.model_name=team/policy", "registry.model_name ('team/policy') is not a valid "
                                        "MLflow model name: it contains '/'"),
    ("registry.model_name=a:b", "it contains ':'"),
    ("registry.model_name=policy@v1", "it contains '@'"),
    ("registry.model_name=..", "it is a path"),
    ("ppo.steps=100000000000000000000000", "ppo.steps = 100000000000000000000000 is not "
                                           "allowed: Input should be at most 1,000,000,000"),
    ("data.n_sft=1.0e+23", "data.n_sft = 1e+23 is not allowed"),
    ("ppo.advantage=ppo2", "ppo.advantage = 'ppo2' is not allowed: Input should be 'gae', "
                           "'grpo', 'rloo' or 'reinforce_pp'"),
    ("ppo.kl_estimator=k4", "Input should be 'k1', 'k2' or 'k3'"),
    ("ppo.advantage=grpo", "ppo.advantage=grpo compares samples of one prompt: set "
                           "ppo.num_generations to 2 or more (it is 1)"),
    ("ppo.num_generations=3", "ppo.batch_size (64) must be divisible by ppo.num_generations "
                              "(3): a rollout is whole groups"),
    ("ppo.reward=banana", "ppo.reward='banana' is not a reward source: use model, gold, or "
                          "module:function"),
    ("ppo.reward=no_such_rewards:score", "ppo.reward='no_such_rewards:score' cannot be loaded: "
                                         "no module named 'no_such_rewards'"),
    ("ppo.reward=json:no_such_function", "module json has no function 'no_such_function'"),
])
def test_bad_values_are_one_line(override, expected):
    with pytest.raises(ParamsError) as info:
        load_params(REPO / "params.yaml", [override])
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_gold_reward_needs_the_builtin_task_and_a_broken_reward_module_stops_the_run(tmp_path):
    with pytest.raises(ParamsError, match="ppo.reward=gold needs a task with a verifier"):
        load_params(REPO / "params.yaml", ["data.source=pairs.jsonl", "ppo.reward=gold"])
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "broken_rewards.py").write_text("import no_such_package\n")
    line = one_line(cli("run", "--params", str(tmp_path / "params.yaml"), "--root",
                        str(tmp_path), "--no-track", "--set", "ppo.reward=broken_rewards:score"))
    assert ("ppo.reward='broken_rewards:score' cannot be loaded: importing broken_rewards "
            "raised ModuleNotFoundError: No module named 'no_such_package'") in line
    assert not (tmp_path / "data").exists()


def test_booleans_still_work_where_booleans_belong():
    params = load_params(REPO / "params.yaml", ["ppo.adaptive_kl=false", "model.lora=true",
                                                "registry.model_name=rlhf.policy-v2_x"])
    assert params.ppo.adaptive_kl is False and params.model.lora is True


def test_bad_params_files_and_a_bad_model_name_stop_before_any_stage(tmp_path):
    line = one_line(cli("stage", "prepare", "--no-track", "--params", str(tmp_path),
                        "--root", str(tmp_path)))
    assert f"params file {tmp_path} is a directory" in line
    latin = tmp_path / "params.yaml"
    latin.write_bytes(b"ppo:\n  steps: 3\n  # caf\xe9\n")
    line = one_line(cli("params", "--params", str(latin)))
    assert f"params file {latin} is not UTF-8 text (line 3)" in line
    line = one_line(cli("run", "--params", str(REPO / "params.yaml"), "--root", str(tmp_path),
                        "--set", "registry.model_name=team/policy"))
    assert "registry.model_name ('team/policy') is not a valid MLflow model name" in line
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()


# --- a pad token the model cannot embed --------------------------------------------------

def test_a_pad_token_outside_the_embeddings_falls_back_to_eos(tmp_path):
    """transformers 5 gives a Qwen2 tokenizer with no pad token `<|endoftext|>` as pad, with
    an id one past the model's embedding matrix; SFT and the reward model still train."""
    import torch
    from transformers import AutoModelForCausalLM

    from .test_architectures import ARCHITECTURES, N_ROWS, build_tokenizer, rows_for, \
        tiny_config

    specials = ARCHITECTURES["qwen2"]["specials"]
    ARCHITECTURES["qwen2"]["specials"] = {"eos_token": "<|im_end|>"}  # no pad token
    try:
        tokenizer = build_tokenizer("qwen2")
    finally:
        ARCHITECTURES["qwen2"]["specials"] = specials
    base = tmp_path / "qwen2"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("qwen2", len(tokenizer), tokenizer)
                                     ).save_pretrained(base)
    tokenizer.save_pretrained(base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps(
        {**config, "tokenizer_class": "Qwen2Tokenizer"}))
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(base)
    assert raw.pad_token == "<|endoftext|>" and raw.pad_token_id == len(tokenizer)  # outside

    from rlhf.models.loading import load_tokenizer

    with pytest.warns(UserWarning, match=r"pads with '<\|endoftext\|>' \(id 300\), outside the "
                                         r"model's 300-token vocabulary; padding with its EOS"):
        assert load_tokenizer(base).pad_token == "<|im_end|>"

    source = write_jsonl(tmp_path / "prefs.jsonl", rows_for("explicit"))
    params = load_params(REPO / "params.yaml", TINY_OVERRIDES + [
        f"data.source={source}", f"model.name_or_path={base}"])
    paths = Paths(tmp_path / "project")
    with pytest.warns(UserWarning, match="outside the model's 300-token vocabulary"):
        for name in ("prepare", "sft", "reward"):
            stages.get(name)(params, paths)
    assert json.loads(paths.metrics_file("sft").read_text())["sft/steps"] > 0
    assert load_tokenizer(paths.sft).pad_token == "<|im_end|>"  # saved as it trained
    assert N_ROWS == 40


def test_promote_with_nothing_registered_is_one_line(tmp_path):
    """`rlhf promote` before any run: one error line, no Prefect traceback or state lines
    (Prefect's and MLflow's INFO lines aside)."""
    (tmp_path / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "PREFECT_HOME": prefect_home(tmp_path / "prefect-home")}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, "-m", "rlhf.cli", "promote", "--version", "3"],
                            capture_output=True, text=True, cwd=tmp_path, env=env)
    lines = [line for line in result.stderr.splitlines() if " INFO " not in line]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == ("error: no registered model 'rlhf-policy' version 3 in the MLflow "
                        "registry; run the pipeline first (`rlhf run`)")
