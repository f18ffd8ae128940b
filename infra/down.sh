#!/usr/bin/env bash
# Stop the stack that infra/up.sh started; the data stays in $RLHF_INFRA_HOME.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
exec "$_rlhf_python" "$_rlhf_root/infra/stack.py" down
