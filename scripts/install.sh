#!/usr/bin/env bash
# Install rlhf and its MLOps stack into ./.venv (or the active virtualenv).
# torch goes first, pinned to the CPU build: a bare `torch` requirement with nothing installed
# pulls a multi-GB CUDA build. GPU users: install the torch build you want before this.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
# DVC first: resolving dvc[s3] together with everything else can backtrack for minutes.
python -m pip install -q "dvc[s3]>=3.60,<4"
case ",${RLHF_EXTRAS:-}," in
  # boto3 at the botocore that dvc[s3]'s aiobotocore pinned, or pip backtracks through releases.
  *,infra,*) python -m pip install -q boto3 \
               "botocore==$(python -c 'import botocore; print(botocore.__version__)')" ;;
esac
python -m pip install -q -e ".[mlops${RLHF_EXTRAS:+,$RLHF_EXTRAS}]"
