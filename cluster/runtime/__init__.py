"""What every job runs on: the Ray connection and the local services (a Ray head, an MLflow server), storage paths
and run directories (local or object storage), MLflow tracking and the model registry, and model sources."""
