#!/usr/bin/env bash
# An MLflow tracking server for a cluster: runs and the model registry in a database,
# artifacts (checkpoints, sample grids) on shared storage, proxied by the server.
#   cluster/mlflow_server.sh [BACKEND_URI] [ARTIFACT_DIR]
set -euo pipefail
BACKEND=${1:-sqlite:////mnt/shared/comfusion/mlflow.db}   # or postgresql://user:pw@host/db
ARTIFACTS=${2:-/mnt/shared/comfusion/mlartifacts}
exec mlflow server --host 0.0.0.0 --port "${MLFLOW_PORT:-5000}" \
  --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS"
