"""The benchmark scripts still import and parse their arguments (they are not run here: each
takes minutes). An import that breaks when the pipeline's code changes shows up as a failed
`--help`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ("vs_trl.py", "ppo_iteration.py", "scaling.py", "algorithms.py", "memory.py",
           "gpu_iteration.py")


# One process for all: each script's imports (torch, transformers) take seconds.
HELP_OF_EACH = """
import contextlib, io, json, os, runpy, sys
answers = {}
sys.path.insert(0, os.path.dirname(sys.argv[1]))  # as for a script: its folder first
for path in sys.argv[1:]:
    sys.argv, out = [path, "--help"], io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    answers[path] = [code, out.getvalue()]
print(json.dumps(answers))
"""


def test_every_benchmark_answers_help():
    paths = [str(REPO / "benchmarks" / name) for name in SCRIPTS]
    run = subprocess.run([sys.executable, "-c", HELP_OF_EACH, *paths], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    answers = json.loads(run.stdout.splitlines()[-1])
    for path, (code, out) in answers.items():
        assert code == 0 and "usage:" in out, f"{path} --help exited {code}:\n{out[-2000:]}"


def test_vs_trl_without_trl_names_the_bench_extra(tmp_path):
    (tmp_path / "trl.py").write_text("raise ImportError('no trl here')\n")  # shadows any trl
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "vs_trl.py")], cwd=REPO,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install -e '.[bench]'" in lines[0], run.stderr
