"""The time a resumed run saves: a training stage killed with SIGKILL late in its run, then
rerun, against rerunning it from scratch; both end with the same weights (checked here).

    python benchmarks/resume.py --root .                  # ppo on the default params
    python benchmarks/resume.py --root . --stage sft --set sft.checkpoint_every=100

`--root` is a project whose upstream stages have run (`rlhf run` once). The stage runs in two
copies of it: one straight through (what a rerun without resume costs), one killed right after
the checkpoint nearest to `--kill-at` of its steps, then rerun (what resume costs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlhf import checkpoints as ckpt
from rlhf.config import load_params, write_overrides
from rlhf.io import tree_hashes

OUTPUT = {"sft": "models/sft", "reward": "models/reward", "ppo": "models/policy"}
COPY = {"sft": ("data",), "reward": ("data", "models"), "ppo": ("data", "models")}


def stage_command(root: Path, stage: str) -> list[str]:
    return [sys.executable, "-m", "rlhf.cli", "stage", stage, "--no-track", "--root", str(root),
            "--params", str(root / "params.yaml")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--params", type=Path, default=None)
    parser.add_argument("--stage", choices=sorted(OUTPUT), default="ppo")
    parser.add_argument("--kill-at", type=float, default=0.66,
                        help="Kill after the first checkpoint at or past this fraction of steps.")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    params_file = args.params or args.root / "params.yaml"
    params = load_params(params_file, args.overrides)  # validates the overrides
    work = Path(tempfile.mkdtemp(prefix="rlhf-resume-"))
    env = {**os.environ, "RLHF_NO_PROGRESS": "1"}
    try:
        copies = {}
        for name in ("straight", "killed"):
            root = work / name
            for folder in COPY[args.stage]:
                shutil.copytree(args.root / folder, root / folder)
            shutil.rmtree(root / OUTPUT[args.stage], ignore_errors=True)
            shutil.copy(params_file, root / "params.yaml")
            write_overrides(root / "params.yaml", args.overrides)
            copies[name] = root

        start = time.perf_counter()
        subprocess.run(stage_command(copies["straight"], args.stage), env=env, check=True,
                       stdout=subprocess.DEVNULL)
        straight = time.perf_counter() - start
        total = ckpt.read_state(ckpt.checkpoint_dirs(
            copies["straight"] / "checkpoints" / args.stage)[-1])["step"]

        killed = copies["killed"]
        process = subprocess.Popen(stage_command(killed, args.stage), env=env,
                                   stdout=subprocess.DEVNULL, start_new_session=True)
        directory = killed / "checkpoints" / args.stage
        while True:
            state = ckpt.resumable(directory)
            if state and state["step"] >= args.kill_at * total:
                break
            if process.poll() is not None:
                sys.exit(f"the {args.stage} run ended before a checkpoint at {args.kill_at:.0%} "
                         f"of {total} steps; lower {args.stage}.checkpoint_every")
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        killed_at = ckpt.resumable(directory)["step"]
        start = time.perf_counter()
        subprocess.run(stage_command(killed, args.stage), env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        resumed = time.perf_counter() - start
        same = (tree_hashes(killed / OUTPUT[args.stage])
                == tree_hashes(copies["straight"] / OUTPUT[args.stage]))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    figures = {
        "stage": args.stage, "steps": total, "killed_after_checkpoint_at_step": killed_at,
        "rerun_from_scratch_s": round(straight, 1), "rerun_resumed_s": round(resumed, 1),
        "saved_s": round(straight - resumed, 1), "saved_fraction": round(1 - resumed / straight, 3),
        "same_weights": same, "checkpoint_every": getattr(params, args.stage).checkpoint_every,
    }
    print(json.dumps(figures, indent=2))
    print(f"{args.stage}: a kill -9 after step {killed_at} of {total} costs {resumed:.1f} s to "
          f"finish with resume, against {straight:.1f} s from scratch: {straight - resumed:.1f} s "
          f"({1 - resumed / straight:.0%}) saved; weights identical: {same}")


if __name__ == "__main__":
    main()
