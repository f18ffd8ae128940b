"""configs/accelerate/*.yaml are files the installed Accelerate accepts, with the settings their
README promises; scripts/install.sh picks the torch build it says it does.

Nothing here launches processes or installs anything: the configs go through Accelerate's own
config class (which rejects unknown keys), its launcher's option parser and the environment its
launcher would hand the processes, from which its FSDP and DeepSpeed plugins are built. The
install script runs in its `--print-choice` mode with a fake `nvidia-smi`, a `python` without
site-packages (or with a fake torch), and local package indexes (one serving, one refusing).
"""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from rlhf.mlops.launch import free_port

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "accelerate"
INSTALL = REPO / "scripts" / "install.sh"

# file -> (distributed_type, mixed_precision, zero_stage or None)
EXPECTED = {
    "ddp.yaml": ("MULTI_GPU", "bf16", None),
    "deepspeed_zero2.yaml": ("DEEPSPEED", "bf16", 2),
    "deepspeed_zero3.yaml": ("DEEPSPEED", "bf16", 3),
    # MULTI_GPU is what makes `accelerate launch` start the processes; the stages' CPU
    # Accelerator turns them into MULTI_CPU on gloo (see the file's header).
    "cpu_ddp.yaml": ("MULTI_GPU", "no", None),
}
NAMES = sorted(EXPECTED)


def _load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def test_the_folder_holds_exactly_the_documented_configs():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == NAMES
    readme = (CONFIGS / "README.md").read_text()
    for name in NAMES:
        assert f"`{name}`" in readme


@pytest.mark.parametrize("name", NAMES)
def test_config_settings(name):
    settings = _load(name)
    distributed_type, precision, zero_stage = EXPECTED[name]
    assert settings["distributed_type"] == distributed_type
    assert settings["compute_environment"] == "LOCAL_MACHINE"
    # A string, not YAML 1.1's false for a bare `no`, which Accelerate's launcher cannot read.
    assert settings["mixed_precision"] == precision
    assert settings["num_machines"] == 1
    if distributed_type == "DEEPSPEED":
        assert settings["deepspeed_config"]["zero_stage"] == zero_stage
    if distributed_type == "FSDP":
        fsdp = settings["fsdp_config"]
        assert fsdp["fsdp_version"] == 2
        assert fsdp["fsdp_reshard_after_forward"] is True  # FSDP2's full shard
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "GPT2Block"
    if name == "cpu_ddp.yaml":
        assert settings["num_processes"] == 2 and settings["use_cpu"] is True


@pytest.mark.parametrize("name", NAMES)
def test_config_starts_with_its_purpose_and_launch_command(name):
    text = (CONFIGS / name).read_text()
    header = text.split("\ncompute_environment:")[0]
    assert all(line.startswith("#") or not line.strip() for line in header.splitlines())
    assert f"accelerate launch --config_file configs/accelerate/{name}" in header


@pytest.mark.parametrize("name", NAMES)
def test_accelerate_accepts_every_field(name):
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    config = ClusterConfig.from_yaml_file(yaml_file=str(CONFIGS / name))  # unknown keys raise
    assert config.distributed_type.value == EXPECTED[name][0]
    # The nested sections are copied onto the launcher's options (fsdp_config.x as fsdp_x)
    # without a check of their own: each key must be one of `accelerate launch`'s options.
    options = {action.dest for action in launch_command_parser()._actions}
    settings = _load(name)
    for section, prefix in (("fsdp_config", "fsdp_"), ("deepspeed_config", "")):
        for key in settings.get(section) or {}:
            option = key if key.startswith(prefix) else prefix + key
            assert option in options, f"{name}: {section}.{key} is no `accelerate launch` option"


def _launcher_view(name: str):
    """What `accelerate launch --config_file NAME` would run: its resolved options and the
    environment it hands the processes (nothing is started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "x.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
    return args, changed


@pytest.mark.parametrize("name", NAMES)
def test_the_launcher_reads_each_config_as_promised(name):
    pytest.importorskip("accelerate")
    try:
        from accelerate.commands.launch import _validate_launch_command  # noqa: F401
    except ImportError:
        pytest.skip("this Accelerate's launcher has no _validate_launch_command")
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin, patch_environment

    args, env = _launcher_view(name)
    distributed_type = EXPECTED[name][0]
    # Every file goes to torchrun (several processes), DeepSpeed's through its own launcher.
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (
        distributed_type == "MULTI_GPU", distributed_type == "FSDP", distributed_type == "DEEPSPEED")
    assert env["ACCELERATE_MIXED_PRECISION"] == EXPECTED[name][1]
    with patch_environment(**env):
        if distributed_type == "FSDP":
            plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
            assert plugin.transformer_cls_names_to_wrap == ["GPT2Block"]
            assert plugin.state_dict_type.name == "FULL_STATE_DICT"
            assert plugin.cpu_ram_efficient_loading is False
        if distributed_type == "DEEPSPEED":
            plugin = DeepSpeedPlugin()
            zero = plugin.deepspeed_config["zero_optimization"]
            assert plugin.zero_stage == zero["stage"] == EXPECTED[name][2]
            assert plugin.deepspeed_config["gradient_accumulation_steps"] == 1
            assert zero["stage3_gather_16bit_weights_on_model_save"] is (EXPECTED[name][2] == 3)


# --- scripts/install.sh: which torch build it picks -------------------------------------

FAKE_SMI_GPUS = """#!/bin/sh
[ "$1" = -L ] || exit 2
echo "GPU 0: NVIDIA H200 (UUID: GPU-00000000-0000-0000-0000-000000000000)"
echo "GPU 1: NVIDIA H200 (UUID: GPU-00000000-0000-0000-0000-000000000001)"
"""
FAKE_SMI_NONE = """#!/bin/sh
echo "No devices were found"
exit 6
"""
FAKE_TORCH = """__version__ = "2.13.0+cpu"
class version:
    cuda = None
    hip = None
"""
NVIDIA0 = os.path.exists("/dev/nvidia0")


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """Bin folders for the script: tools only (no nvidia-smi), plus each fake nvidia-smi; a
    `python` without site-packages (no torch) and one with a fake CPU torch."""
    root = tmp_path_factory.mktemp("install-choice")
    tools = root / "tools"
    tools.mkdir()
    for tool in ("dirname", "grep", "uname", "timeout", "env"):
        found = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True,
                               text=True).stdout.strip()
        if found:
            (tools / tool).symlink_to(found)
    fake_torch = root / "site"
    (fake_torch / "torch").mkdir(parents=True)
    (fake_torch / "torch" / "__init__.py").write_text(FAKE_TORCH)
    pythons = {}
    for kind, prefix in (("no-torch", ""), ("cpu-torch", f"PYTHONPATH={fake_torch} ")):
        folder = root / kind
        folder.mkdir()
        flags = "-S" if prefix else "-E -S"  # -S: no site-packages, so no real torch
        _executable(folder / "python", f'#!/bin/sh\n{prefix}exec "{sys.executable}" {flags} "$@"\n')
        pythons[kind] = folder
    smis = {}
    for kind, text in (("gpus", FAKE_SMI_GPUS), ("none", FAKE_SMI_NONE)):
        folder = root / f"smi-{kind}"
        folder.mkdir()
        _executable(folder / "nvidia-smi", text)
        smis[kind] = folder
    return {"tools": tools, "python": pythons, "smi": smis, "root": root}


@pytest.fixture(scope="module")
def serving_index(sandbox):
    """A package index that answers (an empty torch/ page) on 127.0.0.1."""
    folder = sandbox["root"] / "index"
    (folder / "torch").mkdir(parents=True)
    (folder / "torch" / "index.html").write_text("<html></html>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def refusing_index():
    """An index URL on a local port nobody listens on: refused at once."""
    return f"http://127.0.0.1:{free_port()}/whl/cpu"


def _choice(sandbox, python="no-torch", smi=None, **env) -> subprocess.CompletedProcess:
    path = [sandbox["python"][python], sandbox["tools"]]
    if smi:
        path.insert(0, sandbox["smi"][smi])
    environment = {"PATH": os.pathsep.join(map(str, path)), "HOME": str(sandbox["root"]),
                   "VIRTUAL_ENV": str(sandbox["root"]), **env}
    return subprocess.run(["/bin/bash" if os.path.exists("/bin/bash") else "bash",
                           str(INSTALL), "--print-choice"],
                          env=environment, capture_output=True, text=True, timeout=60)


def _line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("install.sh: torch: "), result.stdout
    return lines[0][len("install.sh: torch: "):]


def test_install_no_gpu_takes_the_cpu_index(sandbox, serving_index):
    line = _line(_choice(sandbox, RLHF_TORCH_CPU_INDEX=serving_index))
    if NVIDIA0:  # a machine with a GPU but no nvidia-smi on this PATH
        assert line.startswith("the CUDA build") and "/dev/nvidia0 exists" in line
    else:
        assert line == (f"the CPU build, torch==2.13.0 from {serving_index} "
                        "(no nvidia-smi, no /dev/nvidia0)")


def test_install_no_gpu_falls_back_to_the_default_index(sandbox, refusing_index):
    line = _line(_choice(sandbox, smi="none", RLHF_TORCH_CPU_INDEX=refusing_index))
    assert line == ("the CPU build, torch==2.13.0 from pip's default index (nvidia-smi lists "
                    f"no GPU; {refusing_index} did not answer within 5 s)")


def test_install_gpu_takes_the_default_index_cuda_build(sandbox, serving_index):
    line = _line(_choice(sandbox, smi="gpus", RLHF_TORCH_CPU_INDEX=serving_index))
    # `===`: exactly 2.13.0, so a local 2.13.0+cpu wheel cannot stand in for the CUDA build.
    assert line == "the CUDA build, torch===2.13.0 from pip's default index (nvidia-smi lists 2 GPU(s))"
    line = _line(_choice(sandbox, smi="gpus",
                         RLHF_TORCH_CUDA_INDEX="https://download.pytorch.org/whl/cu130"))
    assert line == ("the CUDA build, torch==2.13.0 from https://download.pytorch.org/whl/cu130 "
                    "(nvidia-smi lists 2 GPU(s))")


def test_install_forced_builds(sandbox, serving_index):
    line = _line(_choice(sandbox, smi="gpus", RLHF_TORCH="cpu", RLHF_TORCH_CPU_INDEX=serving_index))
    assert line == f"the CPU build, torch==2.13.0 from {serving_index} (RLHF_TORCH=cpu)"
    line = _line(_choice(sandbox, smi="none", RLHF_TORCH="cuda"))
    assert line == "the CUDA build, torch===2.13.0 from pip's default index (RLHF_TORCH=cuda)"
    assert _line(_choice(sandbox, RLHF_TORCH="skip")) == "not installed (RLHF_TORCH=skip)"
    wrong = _choice(sandbox, RLHF_TORCH="gpu")
    assert wrong.returncode == 2 and "use auto, cpu, cuda or skip" in wrong.stderr


def test_install_keeps_an_importable_torch_unless_forced_to_another_build(sandbox):
    line = _line(_choice(sandbox, python="cpu-torch", smi="gpus"))
    assert line.startswith("keeping the installed torch 2.13.0+cpu, a CPU build (already importable")
    line = _line(_choice(sandbox, python="cpu-torch", RLHF_TORCH="cpu"))
    assert line == "keeping the installed torch 2.13.0+cpu, already a CPU build (RLHF_TORCH=cpu)"
    line = _line(_choice(sandbox, python="cpu-torch", RLHF_TORCH="cuda"))
    assert line == ("the CUDA build, torch===2.13.0 from pip's default index (RLHF_TORCH=cuda; "
                    "replacing the installed torch 2.13.0+cpu, a CPU build)")
