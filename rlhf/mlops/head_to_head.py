"""Candidate against champion, judged by the reward model: the promotion gate's figure on data
without a gold reward.

Both policies are loaded from the registry (the weights that would be served), sampled on the
project's held-out eval prompts (`promote.head_to_head_samples` each), and every pair of
samples on the same prompt is judged by the reward model in `models/reward` (the one the
candidate was trained against: promotion follows the pipeline run that registered it).
"""

from __future__ import annotations

import mlflow
import torch

from rlhf.config import Params
from rlhf.errors import UserError
from rlhf.io import read_jsonl
from rlhf.models.loading import ScalarHeadModel
from rlhf.paths import Paths
from rlhf.stages.evaluate import sample_and_score, select_prompts, win_rate


def _components(registered_name: str, version: int):
    parts = mlflow.transformers.load_model(f"models:/{registered_name}/{version}",
                                           return_type="components")
    return parts["model"].eval(), parts["tokenizer"]


@torch.no_grad()
def rm_win_rate(registered_name: str, candidate: int, champion: int, params: Params,
                paths: Paths) -> float:
    """Share of paired samples where the candidate's response outscores the champion's."""
    prompts = select_prompts(
        [row["prompt"] for row in read_jsonl(paths.prepared / "eval_prompts.jsonl",
                                             produced_by="prepare")],
        params.eval.max_prompts, params.data.seed)
    ours, tokenizer = _components(registered_name, candidate)
    theirs, their_tokenizer = _components(registered_name, champion)
    if their_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"versions {candidate} and {champion} of {registered_name} use different "
                        "tokenizers, so one reward model cannot judge both; set "
                        "promote.min_rm_win_rate_vs_champion=0 to skip this criterion")
    reward_model = ScalarHeadModel.load(paths.reward, params.model.trust_remote_code).eval()
    settings = params.model_copy(update={"eval": params.eval.model_copy(
        update={"n_samples": params.promote.head_to_head_samples})})
    device = torch.device("cpu") if params.train.cpu or not torch.cuda.is_available() \
        else torch.device("cuda")
    torch.manual_seed(params.train.seed + 6)
    scores = []
    for model, label in ((ours, "candidate"), (theirs, "champion")):
        model.to(device)
        # A model as its own reference: the KL is not needed here, and is skipped.
        scores.append(sample_and_score(model, model, reward_model.to(device), tokenizer, prompts,
                                       settings, device, label)["score"])
    return win_rate(scores[0], scores[1])
