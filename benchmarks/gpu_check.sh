#!/usr/bin/env bash
# One command for a GPU machine (about 8 minutes on one H100): the install check, a bf16 PPO
# run of the default pipeline, and one PPO iteration of an ~85M and a ~350M GPT-2 (built
# locally, no download) in figures. Everything goes to $1 (default gpu_check_figures.txt),
# one JSON object per line, besides the console.
#
#   bash benchmarks/gpu_check.sh [FIGURES_FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
figures=$(realpath -m "${1:-gpu_check_figures.txt}")
: > "$figures"
export PREFECT_SERVER_ANALYTICS_ENABLED=false

echo "== install check"
if [ ! -x .venv/bin/rlhf ]; then RLHF_TORCH=cuda bash scripts/install.sh; fi
. scripts/_venv.sh
python - "$figures" <<'EOF'
import json, sys, torch, transformers, accelerate
assert torch.cuda.is_available(), "torch sees no GPU: reinstall with RLHF_TORCH=cuda"
record = {"check": "install", "torch": torch.__version__, "cuda": torch.version.cuda,
          "transformers": transformers.__version__, "accelerate": accelerate.__version__,
          "device": torch.cuda.get_device_name(), "bf16": torch.cuda.is_bf16_supported()}
print(json.dumps(record))
open(sys.argv[1], "a").write(json.dumps(record) + "\n")
EOF

echo "== bf16 PPO run of the default pipeline"
work=$(mktemp -d)
git clone -q . "$work/project"
start=$(date +%s)
(cd "$work/project" && rlhf run --no-track --set train.precision=bf16)
python - "$figures" "$work/project" "$(( $(date +%s) - start ))" <<'EOF'
import json, sys
from pathlib import Path
metrics = Path(sys.argv[2]) / "metrics"
evaluation = json.loads((metrics / "eval.json").read_text())
record = {"check": "pipeline_bf16", "seconds": int(sys.argv[3]),
          "gold_policy": evaluation["policy"]["gold_reward"],
          "gold_sft": evaluation["reference"]["gold_reward"], "kl": evaluation["policy"]["kl"]}
print(json.dumps(record))
open(sys.argv[1], "a").write(json.dumps(record) + "\n")
EOF

echo "== one PPO iteration, ~85M and ~350M"
for size in 85m 350m; do
  python benchmarks/gpu_iteration.py --size "$size" --out "$figures"
done
echo "figures: $figures"
