"""rlhf: a reproducible PPO-RLHF pipeline (stages in rlhf.stages, glue in rlhf.mlops)."""
