#!/usr/bin/env bash
# Stop what start_local.sh started: the Serve app, the Ray head and the MLflow server.
#   cluster/stop_local.sh [STORAGE_DIR]
set -uo pipefail
STORAGE=$(realpath -m "${1:-storage}")
PY=${PYTHON:-python}
# Ray >= 2.59 protects a local head with a token (~/.ray/auth_token); clients need the same mode.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
RAY=${RAY:-$(dirname "$PY")/ray}; command -v "$RAY" >/dev/null 2>&1 || RAY=ray
SERVE=${SERVE:-$(dirname "$PY")/serve}; command -v "$SERVE" >/dev/null 2>&1 || SERVE=serve
if "$RAY" status >/dev/null 2>&1; then
  "$SERVE" shutdown -y >/dev/null 2>&1 || true
  "$RAY" stop --force >/dev/null 2>&1 && echo "ray: stopped"
else
  echo "ray: not running"
fi
PIDFILE="$STORAGE/run/mlflow.pid"
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  kill -- "-$(cat "$PIDFILE")" 2>/dev/null || kill "$(cat "$PIDFILE")"
  echo "mlflow: stopped"
else
  echo "mlflow: not running"
fi
rm -f "$PIDFILE"
