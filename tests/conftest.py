"""Shared test fixtures: the tiny profile and a prepared tiny project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RLHF_NO_PROGRESS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# One torch thread per process (inherited by every subprocess a test starts): the tests run
# three files at a time on two cores, and OpenMP threads spinning on a shared core cost
# ~35% of the wall time (three tiny `rlhf run`s side by side: 63 s each, 39 s with one thread).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent

# A params override that runs the whole pipeline in seconds: a 1-layer model, little data,
# two PPO steps. Tests assert on behaviour, never on the figures of the full default run.
TINY_OVERRIDES = [
    "data.n_sft=400", "data.n_pairs=200", "data.n_pairs_eval=100", "data.n_rl_prompts=64",
    "data.n_eval_prompts=8", "data.max_digits=5",
    "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
    "sft.epochs=2", "sft.batch_size=32", "sft.log_every=5",
    "reward.epochs=1", "reward.batch_size=32", "reward.n_normalise_samples=32", "reward.log_every=2",
    "ppo.steps=2", "ppo.batch_size=16", "ppo.checkpoint_every=1",
    "eval.n_samples=8", "eval.max_k=8", "eval.batch_size=256",
]


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    """A project directory with the repo's params.yaml and the tiny profile written into it."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    from rlhf.config import write_overrides

    write_overrides(tmp_path / "params.yaml", TINY_OVERRIDES)
    return tmp_path


@pytest.fixture(scope="session")
def trained_upstream(tmp_path_factory) -> Path:
    """prepare, sft, reward and reference run once on the tiny profile; copy before changing."""
    from rlhf import stages
    from rlhf.config import load_params
    from rlhf.paths import Paths

    root = tmp_path_factory.mktemp("upstream")
    params = load_params(REPO / "params.yaml", TINY_OVERRIDES)
    for name in ("prepare", "sft", "reward", "reference"):
        stages.get(name)(params, Paths(root))
    return root


@pytest.fixture
def upstream_copy(trained_upstream: Path, tmp_path: Path) -> Path:
    """A private copy of the trained upstream artifacts."""
    for folder in ("data", "models"):
        shutil.copytree(trained_upstream / folder, tmp_path / folder)
    return tmp_path


def _migrated_prefect_database() -> Path:
    """A Prefect database with every migration applied, made once per test session (by one
    xdist worker, the others wait on the lock): a fresh PREFECT_HOME's first server start
    spends ~11 s migrating an empty database, and the tests start dozens."""
    import fcntl
    import tempfile

    session = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
    folder = Path(tempfile.gettempdir()) / f"rlhf-tests-prefect-{session}"
    database = folder / "home" / "prefect.db"
    folder.mkdir(exist_ok=True)
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not database.exists():
            building = folder / "building"
            shutil.rmtree(building, ignore_errors=True)
            env = {**os.environ, "PREFECT_HOME": str(building)}
            env.pop("PREFECT_API_URL", None)
            # The server `rlhf run` starts, started and stopped once: it migrates the database.
            subprocess.run([sys.executable, "-c", "from pathlib import Path; from rlhf.mlops."
                            "prefect_server import temporary_server as t\nwith t(Path('.')): pass"],
                           cwd=folder, env=env, check=True, timeout=600)
            building.rename(folder / "home")
    return database


def prefect_home(path: Path) -> str:
    """A new PREFECT_HOME at `path`, its database already migrated (a copy of
    `_migrated_prefect_database`): what each test's own Prefect server starts from."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(_migrated_prefect_database(), path / "prefect.db")
    return str(path)


def sh(*command: str, cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command as a user would; on failure show its output's tail."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def clone_project(root: Path, extra_files=None) -> dict:
    """A clone-like copy of this repository (tracked files only) in `root`, on the tiny
    profile, committed to a fresh git repository with `extra_files(root)` written first;
    returns the environment to run its commands in (its own Prefect home, no team servers)."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    from rlhf.config import write_overrides

    write_overrides(root / "params.yaml", TINY_OVERRIDES)
    if extra_files is not None:
        extra_files(root)
    env = {**os.environ, "PREFECT_HOME": prefect_home(root / ".prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RLHF_NO_PROGRESS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL"):
        env.pop(name, None)
    sh("git", "init", "-q", cwd=root, env=env)
    (root / ".gitignore").write_text((root / ".gitignore").read_text() + "/.prefect-home/\n")
    assert (root / ".dvc").is_dir(), "the repository ships an initialised .dvc/"
    sh("git", "add", "-A", cwd=root, env=env)
    sh("git", "commit", "-qm", "clone", cwd=root, env=env)
    return env
