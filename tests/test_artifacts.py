"""Verified artifacts: the reference and the reward model are hashed over every file that
defines them, and a truncated, corrupt or incomplete model folder stops a stage with one line
naming the file and the stage to rerun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf import stages
from rlhf.artifacts import CorruptArtifactError, check_safetensors, require_model
from rlhf.config import load_params
from rlhf.errors import MissingInputError
from rlhf.paths import Paths
from rlhf.stages import reference as reference_stage
from rlhf.stages import reward as reward_stage

from .conftest import REPO, TINY_OVERRIDES


@pytest.fixture
def params():
    return load_params(REPO / "params.yaml", TINY_OVERRIDES)


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[:int(len(blob) * keep)])


def cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf.cli", "stage", *args, "--no-track",
                           "--root", str(root)], capture_output=True, text=True, cwd=REPO)


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_the_hashes_cover_config_tokenizer_and_weights(trained_upstream):
    paths = Paths(trained_upstream)
    for directory, record in ((paths.reference, "reference.json"), (paths.reward, "reward.json")):
        files = json.loads((directory / record).read_text())["files"]
        assert {"config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json"} <= set(files), files
        assert record not in files
    assert "generation_config.json" in json.loads(
        (paths.reference / "reference.json").read_text())["files"]
    # The reward model's score normalisation lives in its config.json (rlhf_score_bias).
    assert "rlhf_score_bias" in json.loads((paths.reward / "config.json").read_text())
    assert reference_stage.verify(paths.reference) == json.loads(
        (paths.reference / "reference.json").read_text())["sha256"]
    assert len(reward_stage.verify(paths.reward)) == 64


@pytest.mark.parametrize("name, change", [
    ("config.json", {"layer_norm_epsilon": 0.1}),  # was the step-1 KL of 0.76
    ("tokenizer_config.json", {"model_max_length": 7}),
    ("generation_config.json", {"repetition_penalty": 1.1}),
])
def test_an_edited_reference_file_is_refused(upstream_copy, name, change):
    edit_json(upstream_copy / "models/reference" / name, **change)
    with pytest.raises(CorruptArtifactError, match=r"reference model in .* does not match its "
                                                    r"recorded sha256.*rerun `rlhf stage reference`$"):
        reference_stage.verify(upstream_copy / "models/reference")


def test_an_added_or_removed_reference_file_is_refused(upstream_copy):
    reference = upstream_copy / "models/reference"
    (reference / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(CorruptArtifactError, match=r"added chat_template.jinja\); rerun"):
        reference_stage.verify(reference)
    (reference / "chat_template.jinja").unlink()
    (reference / "generation_config.json").unlink()
    with pytest.raises(CorruptArtifactError, match=r"missing generation_config.json\); rerun"):
        reference_stage.verify(reference)


@pytest.mark.parametrize("name, change", [
    ("config.json", {"layer_norm_epsilon": 0.1}),
    ("config.json", {"rlhf_score_bias": 3.0}),  # the score normalisation
])
def test_ppo_and_evaluate_refuse_an_edited_reward_model(upstream_copy, params, name, change):
    edit_json(upstream_copy / "models/reward" / name, **change)
    for stage in ("ppo", "evaluate"):
        if stage == "evaluate":  # evaluate needs a policy: the SFT model stands in
            import shutil

            shutil.copytree(upstream_copy / "models/sft", upstream_copy / "models/policy")
        with pytest.raises(CorruptArtifactError,
                           match=r"reward model in .* does not match .*rerun `rlhf stage reward`"):
            stages.get(stage)(params, Paths(upstream_copy))


def test_a_truncated_sft_model_is_one_line_naming_file_and_stage(upstream_copy):
    weights = upstream_copy / "models/sft/model.safetensors"
    truncate(weights)
    line = one_line(cli(upstream_copy, "reference"))
    assert f"{weights} is truncated" in line and "rerun `rlhf stage sft`" in line
    line = one_line(cli(upstream_copy, "reward"))
    assert f"{weights} is truncated" in line and "rerun `rlhf stage sft`" in line


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_a_corrupt_json_file_is_one_line_naming_file_and_stage(upstream_copy, name):
    config = upstream_copy / "models/sft" / name
    truncate(config, 0.6)
    line = one_line(cli(upstream_copy, "reference"))
    assert f"{config} is not valid JSON" in line and "rerun `rlhf stage sft`" in line


def test_corrupt_reward_and_policy_weights_name_their_stage(upstream_copy, params):
    import shutil

    head = upstream_copy / "models/reward/model.safetensors"
    blob = bytearray(head.read_bytes())
    blob[0:8] = (10**9).to_bytes(8, "little")  # a header length past the end of the file
    head.write_bytes(bytes(blob))
    with pytest.raises(CorruptArtifactError, match=rf"^{head} is not a readable safetensors "
                                                   r"file .*rerun `rlhf stage reward`$"):
        stages.get("ppo")(params, Paths(upstream_copy))
    shutil.copytree(upstream_copy / "models/sft", upstream_copy / "models/policy")
    truncate(upstream_copy / "models/policy/model.safetensors", 0.9)
    with pytest.raises(CorruptArtifactError, match=r"policy/model.safetensors is truncated.*"
                                                   r"rerun `rlhf stage ppo`$"):
        stages.get("evaluate")(params, Paths(upstream_copy))


def test_reference_refuses_an_incomplete_sft_model(upstream_copy, params):
    sft = upstream_copy / "models/sft"
    (sft / "model.safetensors").unlink()
    with pytest.raises(CorruptArtifactError, match=r"incomplete: it has config.json but no "
                                                   r"\.safetensors weights; rerun `rlhf stage sft`"):
        stages.get("reference")(params, Paths(upstream_copy))
    (sft / "config.json").unlink()
    with pytest.raises(MissingInputError, match=r"config.json; run `rlhf stage sft` first"):
        stages.get("reference")(params, Paths(upstream_copy))


def test_a_sharded_model_needs_every_shard(tmp_path, trained_upstream):
    import shutil

    sft = tmp_path / "sft"
    shutil.copytree(Paths(trained_upstream).sft, sft)
    (sft / "model.safetensors").rename(sft / "model-00001-of-00002.safetensors")
    (sft / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CorruptArtifactError, match="names model-00002-of-00002.safetensors, "
                                                   "which is missing; rerun `rlhf stage sft`"):
        require_model(sft, "sft")


def test_safetensors_check_reads_headers_only(tmp_path):
    from safetensors.torch import save_file
    import torch

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(100), "b": torch.ones(3, 4)}, path)
    check_safetensors(path, "sft")
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(CorruptArtifactError, match="need 448 bytes of data, the file has 449"):
        check_safetensors(path, "sft")
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CorruptArtifactError, match="shorter than its header"):
        check_safetensors(path, "sft")
