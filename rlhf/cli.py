"""The `rlhf` command line: run the pipeline, one stage, a schedule, a promotion, or look."""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from rlhf.errors import UserError

app = typer.Typer(
    add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
    help="A reproducible PPO-RLHF pipeline: prepare → sft → reward → reference → ppo → "
         "evaluate → register.")
err = Console(stderr=True)
out = Console()

ParamsOption = typer.Option(Path("params.yaml"), "--params", "-p", help="The params file.")
SetOption = typer.Option(None, "--set", "-s",
                         help="Override a param: section.key=value (repeatable).")
RootOption = typer.Option(Path("."), "--root",
                          help="Project directory holding data/, models/, metrics/.")
FreshOption = typer.Option(False, "--fresh",
                           help="Ignore the checkpoints of an interrupted run and start over.")
PARENT_RUN_ENV = "RLHF_MLFLOW_PARENT_RUN_ID"
# The temporary Prefect server of `rlhf run` (no PREFECT_API_URL) migrates a fresh database
# on its first start: 20 s, Prefect's default, is too short on a busy laptop. No telemetry.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _log_progress_lines() -> None:
    """Progress lines (rlhf.progress) on stderr when no live bar can be drawn there."""
    import logging
    import sys

    from rlhf.mlops.launch import rank

    if sys.stderr.isatty() and not os.environ.get("RLHF_NO_PROGRESS"):
        return
    if rank() != 0:  # a launched group's rank 0 speaks for all
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("rlhf")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


@app.callback()
def _main() -> None:
    from rlhf.mlops import launch

    if launch.in_launched_group():
        # A rank dies with its launcher: torchrun starts ranks in sessions of their own, so a
        # kill -9 of the launched run would otherwise leave them training (and writing).
        launch.die_with_parent(os.getppid())
    _log_progress_lines()


def fail(message: str, code: int = 2) -> None:
    from rlhf.redact import redact_text

    from rich.markup import escape

    # Escaped: a message naming e.g. `pip install -e '.[deepspeed]'` is not rich markup.
    err.print(f"[bold red]error:[/] {escape(redact_text(message))}", highlight=False,
              soft_wrap=True)
    raise typer.Exit(code)


def _load(params_file: Path, overrides: Optional[List[str]]):
    from rlhf.config import load_params

    return load_params(params_file, overrides or [])


def _tracking_available() -> bool:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return False
    return True


@app.command()
def stage(
    name: str = typer.Argument(..., help="prepare, sft, reward, reference, ppo, evaluate or register."),
    params_file: Path = ParamsOption,
    overrides: Optional[List[str]] = SetOption,
    root: Path = RootOption,
    track: bool = typer.Option(True, help="Log the stage to MLflow as a run (a child of "
                                          f"${PARENT_RUN_ENV} when set)."),
    fresh: bool = FreshOption,
) -> None:
    """Run one stage alone (what each dvc.yaml stage calls).

    A training stage (sft, reward, ppo) that was interrupted resumes from its newest
    checkpoint under checkpoints/NAME, continuing the same MLflow run; --fresh starts over.
    With train.num_processes > 1, sft, reward, ppo and evaluate run as a process group
    started by Accelerate's launcher (rank 0 writes and tracks).
    """
    from rlhf import stages
    from rlhf.mlops import launch
    from rlhf.paths import Paths

    paths = Paths(root)
    parent = os.environ.get(PARENT_RUN_ENV)
    try:
        params = _load(params_file, overrides)
        if fresh:
            _delete_checkpoints(paths, [name])
        if launch.wants_launch(name, params):
            launch.run_launched(name, params, paths.root, track=track)
            return
        if launch.rank() != 0:  # another rank of a launched group: rank 0 tracks and reports
            stages.get(name)(params, paths)
            return
        if name == "register":
            from rlhf.mlops import mlflow_tracking as mt
            from rlhf.mlops.register import register

            mt.ensure_reachable(mt.configure(paths.root))
            metrics = register(params, paths, parent_run_id=parent)
        else:
            run = stages.get(name)
            with _stage_logger(name, params, paths, parent, track) as logger:
                metrics = run(params, paths, logger) if logger else run(params, paths)
    except UserError as exc:
        fail(str(exc))
    out.print(f"[bold green]{name}[/] done")
    out.print_json(json.dumps({k: v for k, v in metrics.items()
                               if isinstance(v, (int, float, str, bool))}))


def _delete_checkpoints(paths, names: List[str]) -> None:
    """--fresh: forget the checkpoints of these stages, so they start from step 0."""
    import shutil

    for name in names:
        shutil.rmtree(paths.checkpoints / name, ignore_errors=True)


def _stage_logger(name, params, paths, parent: Optional[str], track: bool):
    if not (track and _tracking_available()):
        return nullcontext(None)
    from rlhf.checkpoints import resumable
    from rlhf.mlops import mlflow_tracking as mt

    uri = mt.configure(paths.root)
    mt.ensure_reachable(uri)
    mt.recover(params.registry.experiment, paths.root)
    interrupted = resumable(paths.checkpoints / name) or {}
    # A launched group's rank 0 logs to the run its launcher opened (the flow's stage run).
    from rlhf.mlops.launch import RUN_ID_ENV

    resume_run = mt.existing_run(os.environ.get(RUN_ID_ENV) or interrupted.get("tracking_run_id"))
    if parent or resume_run:
        # A resumed stage continues the MLflow run its checkpoints were logged to.
        return mt.stage_run(name, parent, resume_run_id=resume_run and resume_run.info.run_id)
    return mt.pipeline_run(params.registry.experiment, params, tags={"stage": name},
                           run_name=f"stage-{name}", project_root=paths.root)


@app.command()
def run(
    params_file: Path = ParamsOption,
    overrides: Optional[List[str]] = SetOption,
    root: Path = RootOption,
    track: bool = typer.Option(True, help="Track the run in MLflow and register the policy; "
                                          "--no-track runs the stages without MLflow."),
    fresh: bool = FreshOption,
) -> None:
    """Run the whole pipeline now as the Prefect flow `rlhf-pipeline`.

    A training stage interrupted by an earlier run resumes from its newest checkpoint;
    --fresh deletes every stage's checkpoints first and starts over.

    Overrides are recorded with the run (MLflow params, tag `rlhf.overrides`, the Prefect
    flow-run parameters, credentials redacted) and written into the params file once the
    training stages have succeeded (as `dvc exp run -S` does), so the file, the artifacts and
    dvc.lock agree afterwards and a crash leaves the file as it was.
    """
    from flows.pipeline import run_pipeline
    from rlhf.mlops.prefect_server import temporary_server

    try:
        _load(params_file, overrides)
        from flows.results import ENV_VAR, RESULTS_DIR
        from rlhf.mlops.safe_results import check_results_dir

        # The flow checks too; here it is one line with no traceback. (Remote storage is
        # checked by the flow, record by record.)
        local = os.environ.get(ENV_VAR, "").strip()
        if "://" not in local:
            check_results_dir(Path(local).expanduser() if local else Path(root) / RESULTS_DIR)
        track = track and _tracking_available()
        if track:
            from rlhf.mlops import mlflow_tracking as mt

            # Before Prefect starts: an unreachable server is one line, not a hang.
            uri = mt.configure(Path(root).resolve())
            mt.ensure_reachable(uri)
        if fresh:
            from rlhf.paths import Paths

            _delete_checkpoints(Paths(root), ["sft", "reward", "ppo"])
        with temporary_server(Path(root)):
            summary = run_pipeline(str(params_file), list(overrides or []), str(root),
                                   track=track)
    except UserError as exc:
        fail(str(exc))
    print_summary(summary, root)


@app.command()
def sync(root: Path = RootOption) -> None:
    """Send to MLflow what tracking outages kept on disk (`.rlhf/mlflow-buffer`)."""
    if not _tracking_available():
        fail("MLflow is not installed; install the package's MLOps extra")
    from rlhf.mlops import mlflow_tracking as mt

    mt.configure(Path(root).resolve())
    results = mt.sync_buffers(Path(root).resolve())
    if not results:
        out.print("nothing to sync: no buffered MLflow records")
        return
    left = 0
    for run_id, sent, note in results:
        if sent is None:
            left += 1
            out.print(f"run {run_id}: not sent ({note})", highlight=False)
        else:
            out.print(f"run {run_id}: sent {sent} buffered records", highlight=False)
    if left:
        raise typer.Exit(1)


@app.command()
def serve(
    cron: str = typer.Option("0 3 * * *", help="When to run, as a cron expression."),
    params_file: Path = ParamsOption,
    overrides: Optional[List[str]] = SetOption,
    root: Path = RootOption,
    name: str = typer.Option("rlhf-pipeline-scheduled", help="Deployment name."),
) -> None:
    """Serve the pipeline on a schedule (Prefect `flow.serve`); stop with Ctrl-C."""
    from flows.pipeline import serve_pipeline

    try:
        _load(params_file, overrides)
        out.print(f"serving [bold]rlhf-pipeline/{name}[/] on cron [bold]{cron}[/]; Ctrl-C stops")
        serve_pipeline(cron, str(params_file), list(overrides or []), str(root), name=name)
    except UserError as exc:
        fail(str(exc))


@app.command()
def promote(
    version: Optional[int] = typer.Option(None, help="Model version; default: the `candidate`."),
    params_file: Path = ParamsOption,
    root: Path = RootOption,
) -> None:
    """Move the `champion` alias to a version if it passes the gate in params `promote`."""
    from flows.pipeline import promote_flow

    try:
        _load(params_file, None)
        decision = promote_flow(str(params_file), version, str(root))
    except UserError as exc:
        fail(str(exc))
    for criterion in decision["criteria"]:
        value = criterion["value"]
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        verdict = "pass" if criterion["passed"] else "FAIL"
        out.print(f"  {verdict}  {criterion['criterion']} = {shown} "
                  f"(needs {criterion['threshold']})", highlight=False)
    if decision["promoted"]:
        out.print(f"[bold green]promoted[/] version {decision['version']} to champion")
        return
    fail(f"version {decision['version']} not promoted: " + "; ".join(decision["reasons"]), code=1)


@app.command()
def status(root: Path = RootOption) -> None:
    """The last run's metrics and where to look."""
    print_summary(None, root)


@app.command("params")
def show_params(params_file: Path = ParamsOption,
                overrides: Optional[List[str]] = SetOption) -> None:
    """Print the validated params (defaults filled in) with each field's meaning."""
    try:
        params = _load(params_file, overrides)
    except UserError as exc:
        fail(str(exc))
    for section, cfg in params:
        out.print(f"[bold]{section}[/]")
        for key, field in type(cfg).model_fields.items():
            out.print(f"  {key} = {getattr(cfg, key)!r}  [dim]# {field.description}[/]",
                      highlight=False)


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def print_summary(summary: Optional[dict], root: Path) -> None:
    """The figures that matter, the candidate and the champion, and where to look."""
    metrics = Path(root) / "metrics"
    evaluation, reward, registered = (_read(metrics / f"{name}.json")
                                      for name in ("eval", "reward", "register"))
    if not evaluation:
        fail(f"no evaluation found in {metrics}; run `rlhf run` first", code=1)
    table = Table(title="rlhf: held-out evaluation", show_header=True)
    for column in ("metric", "policy", "reference (SFT)"):
        table.add_column(column)
    for key in ("gold_reward", "exact_match", "rm_score", "kl", "response_length", "eos_rate"):
        if key in evaluation["policy"]:
            table.add_row(key, f"{evaluation['policy'][key]:.3f}",
                          f"{evaluation['reference'][key]:.3f}")
    for k in ("1", "8", "64"):
        if k in evaluation["policy"].get("pass_at_k", {}):
            table.add_row(f"pass@{k}", f"{evaluation['policy']['pass_at_k'][k]:.3f}",
                          f"{evaluation['reference']['pass_at_k'][k]:.3f}")
    out.print(table)
    budget = (f"KL {evaluation['policy']['kl']:.2f} nats (budget {evaluation['kl_budget']}: "
              f"{'ok' if evaluation['kl_within_budget'] else 'EXCEEDED'})")
    if "gold_ratio" in evaluation:
        out.print(f"gold ratio policy/reference [bold]{evaluation['gold_ratio']:.2f}x[/], "
                  f"win rate {evaluation['win_rate']:.2f}, {budget}")
    if "rm_win_rate" in evaluation:
        out.print(f"RM win rate over the reference {evaluation['rm_win_rate']:.2f}, {budget}")
    if reward:
        ceiling = (f" (noise ceiling {reward['reward/noise_ceiling']:.3f})"
                   if "reward/noise_ceiling" in reward else "")
        out.print(f"reward model accuracy {reward['reward/accuracy']:.3f}{ceiling}")
    if registered:
        out.print(f"model version: [bold]{registered['model_name']}[/] v{registered['version']} "
                  f"(alias {registered['alias']}) registered by the last run")
    if summary and summary.get("resources"):
        cost = Table(title="stages: wall time and peak memory (this run's figures for the "
                           "stages it ran, the cached figures for the rest)", show_header=True)
        for column in ("stage", "state", "wall s", "peak RSS MB", "peak GPU MB"):
            cost.add_column(column)
        for stage, figures in summary["resources"].items():
            cost.add_row(stage, summary.get("stages", {}).get(stage, ""),
                         f"{figures.get('wall_seconds', 0):.1f}",
                         f"{figures.get('peak_rss_mb', 0):.0f}",
                         f"{figures['peak_gpu_mb']:.0f}" if "peak_gpu_mb" in figures else "-")
        out.print(cost)
    ui = _registry_status(Path(root), registered.get("model_name"))
    if summary and summary.get("mlflow_run_url"):
        out.print(f"MLflow run: {summary['mlflow_run_url']}")
    out.print("Where to look:\n"
              f"  MLflow UI:   {ui}\n"
              f"  Prefect UI:  {_prefect_ui()}\n"
              f"  metrics:     {metrics}/*.json, plots in {Path(root) / 'plots'}; "
              "dvc metrics show; dvc plots show", highlight=False)


def _prefect_ui() -> str:
    api = os.environ.get("PREFECT_API_URL")
    if api:
        return api.rstrip("/").removesuffix("/api")
    return "prefect server start  (http://127.0.0.1:4200)"


def _registry_status(root: Path, model_name: Optional[str]) -> str:
    """Print the candidate and the champion from the active tracking store (the one
    MLFLOW_TRACKING_URI names, else the project's SQLite file); return how to open its UI."""
    if not (model_name and _tracking_available()):
        return "pip install mlflow, then mlflow ui"
    from mlflow import MlflowClient

    from rlhf.mlops import registry
    from rlhf.mlops.mlflow_tracking import configure, redact_value

    uri = configure(root)
    shown = redact_value(uri)
    ui = (shown if uri.startswith(("http://", "https://"))
          else f"mlflow ui --backend-store-uri {shown}  (http://127.0.0.1:5000)")
    base = shown.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    try:
        client = MlflowClient()
        for alias in (registry.CANDIDATE, registry.CHAMPION):
            version = registry.alias_version(model_name, alias)
            if version is None:
                out.print(f"{alias}: none yet" + ("; promote with `rlhf promote`"
                                                   if alias == registry.CHAMPION else ""))
                continue
            mv = client.get_model_version(model_name, str(version))
            tags = mv.tags
            figures = ", ".join(f"{label} {float(tags[key]):.3g}" for key, label in (
                ("eval.policy.gold_reward", "gold"), ("eval.gold_ratio", "gold ratio"),
                ("eval.rm_win_rate", "RM win rate"), ("eval.policy.kl", "KL"))
                if key in tags)
            run = client.get_run(mv.run_id) if mv.run_id else None
            link = (f"{base}/#/experiments/{run.info.experiment_id}/runs/{mv.run_id}"
                    if run else "no run")
            commit = tags.get("git.commit", "unknown")[:12]
            out.print(f"{alias}: [bold]{model_name}[/] v{version}: {figures or 'no eval tags'}; "
                      f"git {commit}; {link}", highlight=False)
    except Exception as exc:  # the figures above came from files: the store is optional here
        out.print(f"registry at {shown} not readable ({type(exc).__name__}); "
                  "the figures above are from metrics/", highlight=False)
    return ui


if __name__ == "__main__":  # pragma: no cover
    app()
