"""The `rlhf` command line: run the pipeline, one stage, a schedule, a promotion, or look."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from rlhf.config import load_params
from rlhf.errors import UserError


class _OneLineUserErrors(TyperGroup):
    """A user's mistake (`UserError`) from any command: one line on stderr, exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            fail(str(exc))


app = typer.Typer(
    cls=_OneLineUserErrors, add_completion=False, pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="A reproducible PPO-RLHF pipeline: prepare → sft → reward → reference → ppo → "
         "evaluate → register.")
err = Console(stderr=True)
out = Console()

ParamsOption = typer.Option(Path("params.yaml"), "--params", "-p", help="The params file.")
SetOption = typer.Option(None, "--set", "-s",
                         help="Override a param: section.key=value (repeatable).")


def _existing_root(root: Path) -> Path:
    # A mistyped --root would otherwise start a new, empty project there.
    if not root.is_dir():
        fail(f"--root {root}: no such folder; fix the path, or make a project there "
             f"first (mkdir -p {root} && cp params.yaml {root}/)")
    return root


RootOption = typer.Option(Path("."), "--root", callback=_existing_root,
                          help="Project directory holding data/, models/, metrics/.")
FreshOption = typer.Option(False, "--fresh",
                           help="Ignore the checkpoints of an interrupted run and start over.")
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


def _ensure_tracking(root: Path, **or_else: str) -> None:
    """Before Prefect starts: an unreachable tracking server is one line, not a hang."""
    from rlhf.mlops import mlflow_tracking as mt

    mt.ensure_reachable(mt.configure(Path(root).resolve()), **or_else)


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
                                          "$RLHF_MLFLOW_PARENT_RUN_ID when set)."),
    fresh: bool = FreshOption,
) -> None:
    """Run one stage alone (what each dvc.yaml stage calls).

    A training stage (sft, reward, ppo) that was interrupted resumes from its newest
    checkpoint under checkpoints/NAME, continuing the same MLflow run; --fresh starts over.
    With train.num_processes > 1, sft, reward, ppo and evaluate run as a process group
    started by Accelerate's launcher (rank 0 writes and tracks).
    """
    from rlhf.mlops.runner import PARENT_RUN_ENV, run_stage

    params = load_params(params_file, overrides or [])
    if fresh:
        _delete_checkpoints(root, [name])
    metrics = run_stage(name, params, root, parent_run_id=os.environ.get(PARENT_RUN_ENV),
                        track=track and _tracking_available(), on_line=print)
    out.print(f"[bold green]{name}[/] done")
    out.print_json(json.dumps(metrics))


def _delete_checkpoints(root: Path, names: List[str]) -> None:
    """--fresh: forget the checkpoints of these stages, so they start from step 0."""
    import shutil

    from rlhf.paths import Paths

    for name in names:
        shutil.rmtree(Paths(root).checkpoints / name, ignore_errors=True)


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

    DVC decides which stages have something to do; the others are skipped. A training stage
    interrupted by an earlier run resumes from its newest checkpoint; --fresh deletes every
    stage's checkpoints first and starts over.

    Overrides hold for this run: recorded with it (MLflow params, tag `rlhf.overrides`, the
    Prefect flow-run parameters with credentials redacted, dvc.lock) and kept in the params
    file once the training stages have succeeded; a failed or killed run leaves the file as
    it was.
    """
    from flows.pipeline import run_pipeline
    from flows.prefect_logging import user_errors_in_one_line
    from rlhf.mlops.prefect_server import temporary_server

    user_errors_in_one_line(caller_prints_error=True)

    load_params(params_file, overrides or [])
    track = track and _tracking_available()
    if track:
        _ensure_tracking(root)
    if fresh:
        from rlhf.stages import REGISTRY

        _delete_checkpoints(root, [name for name, info in REGISTRY.items() if info.retries])
    with temporary_server(Path(root)):
        summary = run_pipeline(str(params_file), list(overrides or []), str(root), track=track)
    print_summary(root, summary)


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

    load_params(params_file, overrides or [])
    out.print(f"serving [bold]rlhf-pipeline/{name}[/] on cron [bold]{cron}[/]; Ctrl-C stops")
    serve_pipeline(cron, str(params_file), list(overrides or []), str(root), name=name)


@app.command()
def promote(
    version: Optional[int] = typer.Option(None, help="Model version; default: the `candidate`."),
    params_file: Path = ParamsOption,
    root: Path = RootOption,
) -> None:
    """Move the `champion` alias to a version if it passes the gate in params `promote`."""
    from flows.pipeline import promote_flow
    from flows.prefect_logging import user_errors_in_one_line

    from rlhf.mlops.prefect_server import temporary_server

    user_errors_in_one_line(caller_prints_error=True)
    load_params(params_file, [])
    _ensure_tracking(root, or_else="")  # the registry is what promote is about
    with temporary_server(Path(root)):
        decision = promote_flow(str(params_file), version, str(root))
    from rich.markdown import Markdown

    from rlhf.mlops.report import promotion_report

    out.print(Markdown(promotion_report(decision["model_name"], decision)))
    if decision["promoted"]:
        out.print(f"[bold green]promoted[/] version {decision['version']} to champion")
        return
    fail(f"version {decision['version']} not promoted: " + "; ".join(decision["reasons"]), code=1)


@app.command()
def status(root: Path = RootOption) -> None:
    """The last run's metrics and where to look."""
    print_summary(root)


@app.command("params")
def show_params(params_file: Path = ParamsOption,
                overrides: Optional[List[str]] = SetOption) -> None:
    """Print the validated params (defaults filled in) with each field's meaning."""
    params = load_params(params_file, overrides or [])
    for section, cfg in params:
        out.print(f"[bold]{section}[/]")
        for key, field in type(cfg).model_fields.items():
            out.print(f"  {key} = {getattr(cfg, key)!r}  [dim]# {field.description}[/]",
                      highlight=False)


def print_summary(root: Path, summary: Optional[dict] = None) -> None:
    """The figures that matter, the candidate and the champion, and where to look."""
    from rich.markdown import Markdown

    from rlhf.mlops.report import run_report

    if not (Path(root) / "metrics" / "eval.json").exists():
        fail(f"no evaluation found in {Path(root) / 'metrics'}; run `rlhf run` first", code=1)
    tracking_uri = None
    if _tracking_available():
        from rlhf.mlops.mlflow_tracking import configure

        tracking_uri = configure(Path(root).resolve())
    summary = summary or {}
    out.print(Markdown(run_report(Path(root), summary.get("stages"), summary.get("resources"),
                                  summary.get("mlflow_run_url"), tracking_uri)))


if __name__ == "__main__":  # pragma: no cover
    app()
