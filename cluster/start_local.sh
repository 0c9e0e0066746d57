#!/usr/bin/env bash
# Start a local Ray head and an MLflow server (its backend: sqlite + an artifact folder).
#   cluster/start_local.sh [STORAGE_DIR]      (default: ./storage)
# Ray dashboard / job API: http://127.0.0.1:8265   MLflow UI: http://127.0.0.1:5000
# Ports: RAY_PORT (6379), DASHBOARD_PORT (8265), AGENT_PORT (52365), MLFLOW_PORT (5000); RAY_TEMP_DIR for Ray's
# session files (default /tmp/ray); RAY_START_ARGS are passed to `ray start`.
set -euo pipefail
STORAGE=$(realpath -m "${1:-storage}")
PY=${PYTHON:-python}
# Ray >= 2.59 protects a local head with a token; clients need the same mode.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
RAY=${RAY:-$(dirname "$PY")/ray}; command -v "$RAY" >/dev/null 2>&1 || RAY=ray
MLFLOW=${MLFLOW:-$(dirname "$PY")/mlflow}; command -v "$MLFLOW" >/dev/null 2>&1 || MLFLOW=mlflow
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
AGENT_PORT=${AGENT_PORT:-52365}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
RUN="$STORAGE/run"
mkdir -p "$RUN" "$STORAGE/mlartifacts"

# The head's token: created once, the way Ray documents for local development, in
# ~/.ray/auth_token (or $RAY_AUTH_TOKEN_PATH); every client on this machine (ray job submit,
# serve deploy, the demo) reads the same file. A real cluster sets its own (see README).
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  "$RAY" get-auth-token --generate >/dev/null 2>"$RUN/ray-token.log" \
    || { cat "$RUN/ray-token.log"; echo "ray: could not create an auth token (ray get-auth-token --generate)"; exit 1; }
fi

# MLflow starts first, in the background: its first start (the sqlite schema) then overlaps
# with Ray's; both are waited for below.
MLFLOW_STARTED=0
if [ -f "$RUN/mlflow.pid" ] && kill -0 "$(cat "$RUN/mlflow.pid")" 2>/dev/null; then
  echo "mlflow: already running (pid $(cat "$RUN/mlflow.pid"))"
else
  # Training workers keep HTTP connections to MLflow open between metric flushes (every few
  # seconds); uvicorn's default 5 s keep-alive closed them under the client, which then logged a
  # "connection reset, retrying" warning per flush. Idle connections are kept for 2 minutes.
  setsid "$MLFLOW" server --host 127.0.0.1 --port "$MLFLOW_PORT" \
    --backend-store-uri "sqlite:///$STORAGE/mlflow.db" \
    --artifacts-destination "$STORAGE/mlartifacts" --workers 1 \
    --uvicorn-opts "--timeout-keep-alive 120" >"$RUN/mlflow.log" 2>&1 &
  echo $! >"$RUN/mlflow.pid"
  MLFLOW_STARTED=1
fi

# Is a head already up? Its dashboard answers this at once (`ray status --address` would keep
# retrying for a minute when nothing listens).
if curl -sf -m 5 "http://127.0.0.1:$DASHBOARD_PORT/api/gcs_healthz" >/dev/null 2>&1; then
  echo "ray: a local head is already running on port $RAY_PORT"
else
  # The demo runs a dozen Python workers at once on a 2-CPU head (Serve's controller, proxy and
  # replicas, Train controllers and workers, Ray Data actors, most with fractional CPUs).
  # The raylet starts at most (CPUs) of them in parallel and warns once several times that many
  # have started; on a small machine that is the normal case, so the limit is set to 8 here.
  export RAY_worker_maximum_startup_concurrency=${RAY_worker_maximum_startup_concurrency:-8}
  "$RAY" start --head --port "$RAY_PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
    --dashboard-agent-listen-port "$AGENT_PORT" \
    --disable-usage-stats ${RAY_TEMP_DIR:+--temp-dir "$RAY_TEMP_DIR"} ${RAY_START_ARGS:-} >"$RUN/ray-start.log" 2>&1 \
    || { cat "$RUN/ray-start.log"; exit 1; }
  # Jobs are submitted through the head's dashboard agent, which comes up after `ray start`
  # returns (seconds later on a busy machine): wait for it, or the first submission is refused.
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$AGENT_PORT/api/local_raylet_healthz" >/dev/null 2>&1 && break
    sleep 1
  done
  curl -sf "http://127.0.0.1:$AGENT_PORT/api/local_raylet_healthz" >/dev/null \
    || { echo "ray: the dashboard agent did not come up (see $RUN/ray-start.log)"; exit 1; }
  echo "ray: head started (dashboard http://127.0.0.1:$DASHBOARD_PORT, token in ${RAY_AUTH_TOKEN_PATH:-~/.ray/auth_token})"
fi

if [ "$MLFLOW_STARTED" = 1 ]; then
  # seconds on an idle machine; minutes on a loaded one (MLFLOW_START_TIMEOUT, default 180 s)
  for _ in $(seq 1 "${MLFLOW_START_TIMEOUT:-180}"); do
    curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null 2>&1 && break
    sleep 1
  done
  curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null || { echo "mlflow: did not start"; tail -20 "$RUN/mlflow.log"; exit 1; }
  echo "mlflow: server at http://127.0.0.1:$MLFLOW_PORT (backend sqlite:///$STORAGE/mlflow.db)"
fi
