-- The Prefect database is POSTGRES_DB; MLflow gets its own database owned by the same user.
CREATE DATABASE mlflow;
