#!/usr/bin/env bash
# Install the test needs and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
RLHF_EXTRAS=dev bash scripts/install.sh
. scripts/_venv.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false RLHF_NO_PROGRESS=1
python -m pytest -q "$@"
