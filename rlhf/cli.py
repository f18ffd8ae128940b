"""The `rlhf` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from rlhf.errors import UserError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="A reproducible PPO-RLHF pipeline: prepare → sft → reward → reference → ppo → evaluate.")
err = Console(stderr=True)
out = Console()

ParamsOption = typer.Option(Path("params.yaml"), "--params", "-p", help="The params file.")
SetOption = typer.Option(None, "--set", "-s", help="Override a param: section.key=value (repeatable).")
RootOption = typer.Option(Path("."), "--root", help="Project directory holding data/, models/, metrics/.")


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(params_file: Path, overrides: Optional[List[str]]):
    from rlhf.config import load_params

    return load_params(params_file, overrides or [])


@app.command()
def stage(
    name: str = typer.Argument(..., help="prepare, sft, reward, reference, ppo or evaluate."),
    params_file: Path = ParamsOption,
    overrides: Optional[List[str]] = SetOption,
    root: Path = RootOption,
) -> None:
    """Run one stage alone (what each dvc.yaml stage calls)."""
    from rlhf import stages
    from rlhf.paths import Paths

    try:
        params = _load(params_file, overrides)
        run = stages.get(name)
        metrics = run(params, Paths(root))
    except UserError as exc:
        fail(str(exc))
    out.print(f"[bold green]{name}[/] done")
    out.print_json(json.dumps(_scalars(metrics)))


@app.command("params")
def show_params(params_file: Path = ParamsOption, overrides: Optional[List[str]] = SetOption) -> None:
    """Print the validated params (defaults filled in) with each field's meaning."""
    try:
        params = _load(params_file, overrides)
    except UserError as exc:
        fail(str(exc))
    for section, cfg in params:
        out.print(f"[bold]{section}[/]")
        for key, field in type(cfg).model_fields.items():
            out.print(f"  {key} = {getattr(cfg, key)!r}  [dim]# {field.description}[/]", highlight=False)


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool, dict))}


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
