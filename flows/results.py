"""Where the stage tasks' results (and so the flow's cache) live.

By default `<root>/.prefect-results`, with the project. A team sets `RLHF_RESULT_STORAGE` to a
shared location (`s3://bucket/prefix`, what `source infra/env.sh` exports) so that every worker
reads and writes one cache. The S3 endpoint and keys come from the standard AWS variables
(`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), so
no secret is stored in Prefect. Results are JSON (the tasks' `result_serializer`).

Prefect wants remote result storage saved as a block on its server: it is saved under a name
derived from the location and endpoint (`rlhf-results-<hash>`), holding no credentials.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from rlhf.errors import UserError

RESULTS_DIR = ".prefect-results"
ENV_VAR = "RLHF_RESULT_STORAGE"


def results_location(root: Path) -> Any:
    """A path, or an fsspec file system for a URL such as `s3://prefect/results`."""
    location = os.environ.get(ENV_VAR, "").strip()
    if not location:
        return Path(root) / RESULTS_DIR
    if "://" not in location:
        return Path(location).expanduser()
    from prefect.filesystems import RemoteFileSystem

    if location.startswith("s3://"):
        _require_s3_credentials(location)
    settings: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if location.startswith("s3://") and endpoint:
        settings["client_kwargs"] = {"endpoint_url": endpoint}
    storage = RemoteFileSystem(basepath=location.rstrip("/"), settings=settings)
    name = "rlhf-results-" + hashlib.sha256(
        f"{storage.basepath}|{endpoint}".encode()).hexdigest()[:12]
    try:
        return RemoteFileSystem.load(name)
    except ValueError:  # not saved yet
        pass
    try:
        storage.save(name)
    except ValueError:  # saved meanwhile by a concurrent run
        return RemoteFileSystem.load(name)
    return storage


def _require_s3_credentials(location: str) -> None:
    """Say so in one line before a stage runs, rather than a botocore traceback after it."""
    import botocore.session

    if botocore.session.get_session().get_credentials() is None:
        raise UserError(f"{ENV_VAR}={location} but no S3 credentials were found: "
                        "`source infra/env.sh` (or set AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY)")


def describe(location: Any) -> str:
    return str(getattr(location, "basepath", location))
