#!/usr/bin/env bash
# Start a local Ray head and an MLflow server (its backend: sqlite + an artifact folder).
#   cluster/start_local.sh [STORAGE_DIR]      (default: ./storage)
# Ray dashboard / job API: http://127.0.0.1:8265   MLflow UI: http://127.0.0.1:5000
set -euo pipefail
STORAGE=$(realpath -m "${1:-storage}")
PY=${PYTHON:-python}
# Ray >= 2.59 protects a local head with a token (~/.ray/auth_token); clients need the same mode.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
RAY=${RAY:-$(dirname "$PY")/ray}; command -v "$RAY" >/dev/null 2>&1 || RAY=ray
MLFLOW=${MLFLOW:-$(dirname "$PY")/mlflow}; command -v "$MLFLOW" >/dev/null 2>&1 || MLFLOW=mlflow
MLFLOW_PORT=${MLFLOW_PORT:-5000}
RUN="$STORAGE/run"
mkdir -p "$RUN" "$STORAGE/mlartifacts"

if "$RAY" status >/dev/null 2>&1; then
  echo "ray: a local head is already running"
else
  # Leave one CPU slot's worth of room for Ray Data next to trainers on small machines.
  "$RAY" start --head --dashboard-host 127.0.0.1 --disable-usage-stats ${RAY_START_ARGS:-} >"$RUN/ray-start.log" 2>&1 \
    || { cat "$RUN/ray-start.log"; exit 1; }
  echo "ray: head started (dashboard http://127.0.0.1:8265)"
fi

if [ -f "$RUN/mlflow.pid" ] && kill -0 "$(cat "$RUN/mlflow.pid")" 2>/dev/null; then
  echo "mlflow: already running (pid $(cat "$RUN/mlflow.pid"))"
else
  setsid "$MLFLOW" server --host 127.0.0.1 --port "$MLFLOW_PORT" \
    --backend-store-uri "sqlite:///$STORAGE/mlflow.db" \
    --artifacts-destination "$STORAGE/mlartifacts" --workers 1 >"$RUN/mlflow.log" 2>&1 &
  echo $! >"$RUN/mlflow.pid"
  for _ in $(seq 1 60); do
    curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null 2>&1 && break
    sleep 1
  done
  curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null || { echo "mlflow: did not start"; tail -20 "$RUN/mlflow.log"; exit 1; }
  echo "mlflow: server at http://127.0.0.1:$MLFLOW_PORT (backend sqlite:///$STORAGE/mlflow.db)"
fi
