"""Multi-process stages: `train.num_processes` > 1 runs a stage under Accelerate's launcher.

`rlhf stage NAME` and the Prefect flow's stage tasks call `run_launched`, which starts
`accelerate launch ... -m rlhf.cli stage NAME` (torchrun underneath: one process per rank,
DDP; gloo on CPU) with the run's effective params in a private file. Inside the launched
group every rank runs the stage on its shard of each batch (`rlhf.distributed`); rank 0 alone
writes outputs and checkpoints and talks to MLflow (continuing the stage run the caller
opened, `RUN_ID_ENV`). The launched processes' output comes back line by line, so progress
reaches the caller's log (the Prefect task's logs, under the flow).

Plain `accelerate launch -m rlhf.cli stage NAME` (or torchrun) works too: a process that is
already one rank of a group (`RANK` is set) never launches again.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from rlhf.config import Params
from rlhf.errors import ParamsError, UserError
from rlhf.io import atomic_write_text

RUN_ID_ENV = "RLHF_STAGE_RUN_ID"
"""Set by the caller: the MLflow run the launched stage's rank 0 logs to."""
_log = logging.getLogger("rlhf.launch")


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent thread ends (Linux's
    parent-death signal): a kill -9 of `rlhf run` or `rlhf stage` takes its temporary Prefect
    server and launched ranks with it instead of leaving them running. (A subprocess's
    preexec_fn, or called first thing by a rank.)"""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: only the normal stop applies
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def rank() -> int:
    """This process's rank in a launched group (0 outside one)."""
    return int(os.environ.get("RANK", "0"))


def in_launched_group() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def wants_launch(stage: str, params: Params) -> bool:
    """Whether `stage` must be started through the launcher from this process."""
    from rlhf.stages import info

    return (info(stage).launchable and params.train.num_processes > 1
            and not in_launched_group())


def check_launchable(params: Params) -> None:
    """One line for a launch this machine cannot do: more processes than CPUs (or GPUs), an
    Accelerate config file that is missing, DeepSpeed without its package or GPUs or with
    train.sharding, or Accelerate's FSDP (rlhf's is train.sharding)."""
    import torch

    from rlhf.engine import check_engine_runs

    wanted = params.train.num_processes
    use_gpus = torch.cuda.is_available() and not params.train.cpu
    have = torch.cuda.device_count() if use_gpus else (os.cpu_count() or 1)
    if wanted > have:
        kind = "GPUs" if use_gpus else "CPU cores"
        raise ParamsError(f"train.num_processes={wanted} is more than this machine's {have} "
                          f"{kind}; use at most {have}")
    config = params.train.accelerate_config
    if config is None:
        return
    path = Path(config)
    if not path.is_file():
        raise ParamsError(f"train.accelerate_config={config!r}: no such file; use one of "
                          "configs/accelerate/*.yaml or `accelerate config --config_file PATH`")
    try:
        settings = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ParamsError(f"train.accelerate_config={config!r} is not readable YAML ({exc})")
    asked = str(settings.get("distributed_type", "")).upper()
    deepspeed = asked == "DEEPSPEED"
    if deepspeed and params.train.sharding == "fsdp":
        raise ParamsError(f"train.sharding=fsdp and DeepSpeed ({config}) would both shard the "
                          "models; use one: drop train.accelerate_config or set "
                          "train.sharding=none")
    if deepspeed and params.train.grad_accum > 1:
        # The stages accumulate micro-batches under `no_sync`, which leaves Accelerate's
        # sync_gradients True with DeepSpeed: its backward would step after each micro-batch.
        raise ParamsError(f"train.grad_accum={params.train.grad_accum} with DeepSpeed "
                          f"({config}) would step the optimizer on every micro-batch; set "
                          "train.grad_accum=1 (or use DDP or FSDP)")
    if deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise ParamsError(f"train.accelerate_config={config!r} uses DeepSpeed, which is not "
                          "installed; pip install -e '.[deepspeed]' (or drop the config for DDP)")
    check_engine_runs(asked, asked if use_gpus else "MULTI_CPU")


def launch_command(stage: str, params_file: Path, root: Path, params: Params) -> list[str]:
    """`accelerate launch` of `rlhf stage NAME` with `params.train`'s process settings."""
    n = str(params.train.num_processes)
    if params.train.accelerate_config:
        flags = ["--config_file", params.train.accelerate_config, "--num_processes", n]
    else:
        # `--multi_gpu` with Accelerator(cpu=True) is what gives MULTI_CPU on gloo: `--cpu`
        # would take the single-process path.
        flags = ["--multi_gpu", "--num_processes", n, "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no"]
    flags += ["--main_process_port", str(free_port())]
    return [sys.executable, "-m", "accelerate.commands.launch", *flags, "-m", "rlhf.cli",
            "stage", stage, "--params", str(params_file), "--root", str(root)]


def run_launched(stage: str, params: Params, root: Path, run_id: Optional[str] = None,
                 track: bool = True, on_line: Callable[[str], None] = print) -> None:
    """Run `stage` as a launched process group and wait for it; its output goes line by line
    to `on_line`. Raises UserError with the group's last error line if it fails."""
    from rlhf.distributed import check_batches

    check_launchable(params)
    check_batches(stage, params, params.train.num_processes)  # before anything is launched
    root = Path(root).resolve()
    # The effective params (overrides applied), private: they may hold credentials.
    params_file = root / ".rlhf" / f"launch-{stage}-{os.getpid()}.yaml"
    params_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(params_file, yaml.safe_dump(params.model_dump(mode="json"),
                                                  sort_keys=False))
    os.chmod(params_file, 0o600)
    command = launch_command(stage, params_file, root, params)
    if not track:
        command.append("--no-track")
    env = {**os.environ, "RLHF_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
    if run_id:
        env[RUN_ID_ENV] = run_id
    last_error = ""
    try:
        parent = os.getpid()
        with subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, bufsize=1,
                              preexec_fn=lambda: die_with_parent(parent)) as group:
            for line in group.stdout:
                line = line.rstrip("\n")
                if line.startswith("error:"):
                    last_error = line[len("error:"):].strip()
                on_line(line)
            code = group.wait()
    finally:
        params_file.unlink(missing_ok=True)
    if code != 0:
        raise UserError(last_error or f"the launched `{stage}` stage ({params.train.num_processes} "
                        f"processes) exited with code {code}; its output is above")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen, timeout: float, what: str,
                       log: Path, or_else: str = "") -> None:
    """Poll GET `url` until it answers 200. UserError naming `log` (and `or_else`, what else
    to do) if the `server` process exits first or `timeout` seconds pass."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise UserError(f"{what} exited with code {server.returncode}; see {log}{or_else}")
        if time.monotonic() > deadline:
            raise UserError(f"{what} did not answer within {timeout:.0f} s; see {log}{or_else}")
        time.sleep(0.2)
