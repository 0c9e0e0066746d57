#!/usr/bin/env bash
# The MLflow tracking server for ComFusion, behind MLflow's own basic-auth app.
#
#   cluster/mlflow_server.sh [--check]       # --check: print the command and exit
#
# Local (the default): sqlite files under $COMFUSION_MLFLOW_STATE, bound to 127.0.0.1; basic auth
# when MLFLOW_AUTH_ADMIN_PASSWORD is set, else open (only this machine reaches it).
# Cluster (MLFLOW_HOST not a loopback address, so other hosts reach it): the backend must be
# Postgres (several hosts write runs at once) and the auth settings below must be set.
# Needs `pip install "mlflow[auth]"` (basic auth) and psycopg2-binary (Postgres).
#
# Environment (on a cluster every secret comes from a secret store, never from this repository):
#   MLFLOW_HOST                  interface to bind (default 127.0.0.1)
#   MLFLOW_PORT                  default 5000
#   MLFLOW_BACKEND_STORE_URI     runs and model registry; default sqlite (local only), postgresql://... on a cluster
#   MLFLOW_AUTH_DATABASE_URI     users and permissions (a database of its own); default sqlite beside the backend
#   MLFLOW_ARTIFACTS_DESTINATION artifacts (checkpoints, sample grids), e.g. /mnt/shared/comfusion/mlartifacts
#   MLFLOW_AUTH_ADMIN_USERNAME   admin account, created on the first start (default admin)
#   MLFLOW_AUTH_ADMIN_PASSWORD   its password
#   MLFLOW_FLASK_SERVER_SECRET_KEY  signs the auth app's session cookies
#   MLFLOW_ALLOWED_HOSTS         Host headers accepted from other hosts, e.g. "10.*,mlflow.internal:5000"
#   COMFUSION_MLFLOW_STATE       folder for the local sqlite files and the auth config (default ./storage/mlflow-server)
set -euo pipefail

CHECK=0
case "${1:-}" in
  --check) CHECK=1 ;;
  -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
  "") ;;
  *) echo "mlflow_server.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac

die() { echo "mlflow_server.sh: $*" >&2; exit 1; }

STATE=${COMFUSION_MLFLOW_STATE:-./storage/mlflow-server}
HOST=${MLFLOW_HOST:-127.0.0.1}
PORT=${MLFLOW_PORT:-5000}
BACKEND=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$STATE/mlflow.db}
AUTH_DB=${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$STATE/basic_auth.db}
ARTIFACTS=${MLFLOW_ARTIFACTS_DESTINATION:-$STATE/mlartifacts}

case "$HOST" in
  127.*|localhost|::1) REMOTE=0 ;;
  *) REMOTE=1 ;;
esac

AUTH=0
if [ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]; then AUTH=1; fi
if [ "$REMOTE" = 1 ]; then
  [ "$AUTH" = 1 ] || die "MLFLOW_HOST=$HOST serves other hosts: set MLFLOW_AUTH_ADMIN_PASSWORD (from a secret)"
  [ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ] || die "MLFLOW_HOST=$HOST: set MLFLOW_FLASK_SERVER_SECRET_KEY"
  case "$BACKEND" in
    postgresql://*|postgresql+*://*) ;;
    *) die "MLFLOW_HOST=$HOST serves other hosts: MLFLOW_BACKEND_STORE_URI must be postgresql://... (is ${BACKEND%%:*})" ;;
  esac
  case "$AUTH_DB" in
    postgresql://*|postgresql+*://*) ;;
    *) die "MLFLOW_HOST=$HOST: MLFLOW_AUTH_DATABASE_URI must be postgresql://... (a database of its own)" ;;
  esac
  [ "$AUTH_DB" != "$BACKEND" ] || die "MLFLOW_AUTH_DATABASE_URI must name another database than the backend"
fi

CMD=(mlflow server --host "$HOST" --port "$PORT" --backend-store-uri "$BACKEND"
     --artifacts-destination "$ARTIFACTS")
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then CMD+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"); fi
if [ "$AUTH" = 1 ]; then
  CMD+=(--app-name basic-auth)
  export MLFLOW_AUTH_ADMIN_USERNAME=${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
  # Generated per start from the environment; nobody gets access without an account.
  export MLFLOW_AUTH_CONFIG_PATH=$STATE/basic_auth.ini
  if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then  # local only (checked above): a fresh key per start
    MLFLOW_FLASK_SERVER_SECRET_KEY=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
fi

if [ "$CHECK" = 1 ]; then
  # The URIs may hold a database password: show them without it.
  printf '%q ' "${CMD[@]}" | sed -E 's#(://[^:/@ ]*):[^@ ]*@#\1:***@#g'; echo
  echo "auth=$AUTH remote=$REMOTE auth_db=$(echo "$AUTH_DB" | sed -E 's#(://[^:/@]*):[^@]*@#\1:***@#')"
  exit 0
fi

mkdir -p "$STATE"
case "$ARTIFACTS" in *://*) ;; *) mkdir -p "$ARTIFACTS" ;; esac
if [ "$AUTH" = 1 ]; then
  umask 077
  cat > "$MLFLOW_AUTH_CONFIG_PATH" <<EOF
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = $AUTH_DB
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
fi
exec "${CMD[@]}"
