"""The MLOps glue around the stages: DVC, MLflow, Prefect, launching. Stages never import it."""
