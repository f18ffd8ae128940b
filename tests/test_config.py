"""Params: typed sections, overrides, and one-line errors for bad input."""

import subprocess
import sys

import pytest

from rlhf.config import Params, load_params, parse_override
from rlhf.errors import ParamsError


def test_defaults_match_params_yaml():
    assert load_params("params.yaml") == Params()


def test_every_field_is_documented():
    for section in Params.model_fields:
        cls = Params.model_fields[section].annotation
        for key, field in cls.model_fields.items():
            assert field.description, f"{section}.{key} has no docstring"


def test_overrides_are_parsed_as_yaml(tmp_path):
    assert parse_override("ppo.kl_coef=0.1") == (["ppo", "kl_coef"], 0.1)
    assert parse_override("ppo.adaptive_kl=false") == (["ppo", "adaptive_kl"], False)
    params = load_params("params.yaml", ["ppo.kl_coef=0.2", "model.name_or_path=some/model"])
    assert params.ppo.kl_coef == 0.2 and params.model.name_or_path == "some/model"


@pytest.mark.parametrize("override, expected", [
    ("ppo.kl_coeff=0.1", "unknown key 'ppo.kl_coeff'"),
    ("ppo.kl_coef=abc", "ppo.kl_coef = 'abc' is not allowed"),
    ("ppo.cliprange=-1", "greater than 0"),
    ("ppo.value_model=critic", "'reward' or 'policy_head'"),
    ("eval.kl_budget=7", "less than or equal to 5"),
    ("data.min_digits=9", "data.min_digits (9) must be <= data.max_digits (7)"),
    ("ppo.batch_size=63", "divisible"),
    ("nosuchsection.x=1", "unknown key 'nosuchsection'"),
    ("model.revision=v1.0", "model.revision ('v1.0') pins a hub model; with "
                            "model.name_or_path=builtin set it to null"),
    ("data.revision=main", "data.revision applies to external data only"),
    ("model.n_head=3", "model.n_head (3) must divide model.n_embd (128)"),
    ("train.sharding=zero", "'none' or 'fsdp'"),
    ("novalue", "section.key=value"),
])
def test_bad_params_name_key_value_and_fix(override, expected):
    with pytest.raises(ParamsError) as info:
        load_params("params.yaml", [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_fp16_is_refused_with_sharding():
    """Sharded models skip Accelerate's prepared optimizer, where fp16's loss scaling lives."""
    with pytest.raises(ParamsError, match="fp16 does not work with train.sharding=fsdp"):
        load_params("params.yaml", ["train.sharding=fsdp", "train.precision=fp16"])


def test_missing_and_malformed_params_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_cli_reports_bad_param_in_one_line_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "stage", "ppo", "--set", "ppo.kl_coef=-1"],
        capture_output=True, text=True)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "ppo.kl_coef = -1 is not allowed" in lines[0]
    assert "Traceback" not in result.stderr
