# Source me: `source infra/env.sh` exports MLFLOW_TRACKING_URI, PREFECT_API_URL, and the S3
# endpoint and keys that DVC and the Prefect result storage use.
. "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
if _rlhf_exports="$("$_rlhf_python" "$_rlhf_root/infra/stack.py" env)"; then
  eval "$_rlhf_exports"
fi
unset _rlhf_exports _rlhf_python _rlhf_root
