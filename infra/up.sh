#!/usr/bin/env bash
# Start the team stack natively: PostgreSQL, SeaweedFS S3, MLflow server, Prefect server and a
# process worker. Idempotent; state in $RLHF_INFRA_HOME (default infra/.state). See README.md.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
exec "$_rlhf_python" "$_rlhf_root/infra/stack.py" up
