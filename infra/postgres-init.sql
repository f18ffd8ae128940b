-- Databases of the MLflow and Prefect servers (docker-compose; infra/stack.py does the same).
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
\c prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
