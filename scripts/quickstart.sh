#!/usr/bin/env bash
# Install, then run the whole pipeline on the embedded default (builtin task, builtin model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. scripts/_venv.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false
rlhf run "$@"
echo
dvc status
