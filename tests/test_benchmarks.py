"""The benchmark scripts still import and parse their arguments (they are not run here: each
takes minutes). An import that breaks when the pipeline's code changes shows up as a failed
`--help`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ("vs_trl.py", "ppo_iteration.py", "scaling.py", "algorithms.py", "memory.py",
           "gpu_iteration.py")


def test_every_benchmark_answers_help():
    runs = {name: subprocess.Popen([sys.executable, str(REPO / "benchmarks" / name), "--help"],
                                   cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
            for name in SCRIPTS}  # side by side: each import of torch takes seconds
    for name, run in runs.items():
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, f"{name} --help exited {run.returncode}:\n{err[-2000:]}"
        assert "usage:" in out


def test_vs_trl_without_trl_names_the_bench_extra(tmp_path):
    (tmp_path / "trl.py").write_text("raise ImportError('no trl here')\n")  # shadows any trl
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "vs_trl.py")], cwd=REPO,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install -e '.[bench]'" in lines[0], run.stderr
