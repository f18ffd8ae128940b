# Sourced by up.sh/down.sh/env.sh: the interpreter that has the project and its infra extra
# (mlflow, prefect and weed are taken from its bin folder).
_rlhf_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${RLHF_PYTHON:-}" ]; then _rlhf_python="$RLHF_PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ]; then _rlhf_python="$VIRTUAL_ENV/bin/python"
elif [ -x "$_rlhf_root/.venv/bin/python" ]; then _rlhf_python="$_rlhf_root/.venv/bin/python"
else _rlhf_python="python3"; fi
