"""Prefect flow runs left Running by a killed process are ended Crashed by the next start.

Prefect cannot tell that the process running a flow was killed: its flow run (and the task
run that was executing) stay Running. Each `rlhf-pipeline` run writes who runs it (host, pid,
process start time) to `<root>/.rlhf/flow-runs/<flow_run_id>.json` and removes the file when
it ends; the next run on this host finds files whose process is gone and sets those runs
Crashed, Prefect's state for "the process running it died".
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.mlops import owner

RUNS_DIR = Path(".rlhf") / "flow-runs"


def record(project_root: Path, flow_run_id: str) -> Path:
    """Note that this process runs `flow_run_id`; returns the file to remove when it ends."""
    path = Path(project_root) / RUNS_DIR / f"{flow_run_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"flow_run_id": str(flow_run_id), **owner.me()}))
    return path


def end_dead(project_root: Path) -> list[str]:
    """Set Crashed every flow run (and its unfinished task runs) whose process is gone."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    folder = Path(project_root) / RUNS_DIR
    if not folder.is_dir():
        return []
    ended = []
    with get_client(sync_client=True) as client:
        for path in sorted(folder.glob("*.json")):
            try:
                who = json.loads(path.read_text())
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
                continue
            if not owner.is_dead(who):
                continue
            message = (f"process {who.get('pid')} on {who.get('host')} was gone; "
                       "ended by a later rlhf run")
            try:
                flow_run = client.read_flow_run(who["flow_run_id"])
            except (ObjectNotFound, KeyError):
                path.unlink(missing_ok=True)  # another server's run, or a wiped database
                continue
            if flow_run.state is None or not flow_run.state.is_final():
                tasks = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
                for task_run in tasks:
                    if task_run.state is None or not task_run.state.is_final():
                        client.set_task_run_state(task_run.id, Crashed(message=message),
                                                  force=True)
                client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
                ended.append(str(flow_run.id))
            path.unlink(missing_ok=True)
    return ended
