#!/usr/bin/env bash
# The pipeline's local services, all on 127.0.0.1:
#   prefect      Prefect server (API + UI), SQLite database in $PREFECT_HOME
#   mlflow       MLflow tracking server + UI, backend sqlite:///mlflow.db (project root), artifacts in mlartifacts/
#   deployments  `python infra/deployments.py serve`: registers the deployments and runs their flow runs
#
#   infra/services.sh start|stop|restart|status|env|logs [service ...]     (default: all three)
#   eval "$(infra/services.sh env)"      # PREFECT_API_URL, PREFECT_HOME, MLFLOW_TRACKING_URI for this shell
#
# Configuration (environment):
#   LENS_PREFECT_PORT=4200  LENS_MLFLOW_PORT=5000   ports on 127.0.0.1
#   LENS_SERVICES_DIR=.services                     logs/ (one file per service) and run/ (pid files)
#   LENS_PREFECT_HOME=$LENS_SERVICES_DIR/prefect    PREFECT_HOME of the server and the serving process
#   LENS_MLFLOW_BACKEND_URI=sqlite:///mlflow.db     relative SQLite paths are relative to the project root
#   LENS_MLFLOW_ARTIFACTS=mlartifacts               where the MLflow server stores artifacts
#   LENS_START_TIMEOUT=240                          seconds each service gets to become healthy
set -euo pipefail
set +m  # background jobs stay in this process group until setsid gives each its own session

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOST=127.0.0.1
PREFECT_PORT=${LENS_PREFECT_PORT:-4200}
MLFLOW_PORT=${LENS_MLFLOW_PORT:-5000}
SERVICES_DIR=${LENS_SERVICES_DIR:-$ROOT/.services}
PREFECT_HOME_DIR=${LENS_PREFECT_HOME:-$SERVICES_DIR/prefect}
MLFLOW_BACKEND=${LENS_MLFLOW_BACKEND_URI:-sqlite:///mlflow.db}
MLFLOW_ARTIFACTS=${LENS_MLFLOW_ARTIFACTS:-$ROOT/mlartifacts}
TIMEOUT=${LENS_START_TIMEOUT:-240}
BIN=${LENS_VENV_BIN:-$ROOT/.venv/bin}
LOGS=$SERVICES_DIR/logs
RUN=$SERVICES_DIR/run
ALL=(prefect mlflow deployments)

PREFECT_URL=http://$HOST:$PREFECT_PORT
MLFLOW_URL=http://$HOST:$MLFLOW_PORT
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true

say() { printf 'services: %s\n' "$*"; }
pidfile() { echo "$RUN/$1.pid"; }
logfile() { echo "$LOGS/$1.log"; }

pid_of() {  # the recorded pid if that process is alive
  local f; f=$(pidfile "$1")
  [[ -f $f ]] || return 1
  local pid; pid=$(cat "$f")
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

healthy() {
  case $1 in
    prefect) curl -sf -m 5 "$PREFECT_URL/api/health" >/dev/null ;;
    mlflow) curl -sf -m 5 "$MLFLOW_URL/health" >/dev/null ;;
    deployments)
      # Written by the serving process once every deployment is registered and it polls for runs.
      grep -q "being served" "$(logfile deployments)" 2>/dev/null &&
        curl -sf -m 5 "$PREFECT_URL/api/deployments/name/lens-compare/tiny" >/dev/null ;;
  esac
}

url_of() {
  case $1 in
    prefect) echo "$PREFECT_URL" ;;
    mlflow) echo "$MLFLOW_URL" ;;
    deployments) echo "lens-train/tiny, lens-compare/tiny, lens-study/tiny (served), lens-train/paper (work pool ${LENS_GPU_POOL:-lens-gpu})" ;;
  esac
}

port_of() { case $1 in prefect) echo "$PREFECT_PORT" ;; mlflow) echo "$MLFLOW_PORT" ;; *) echo "" ;; esac; }

init_mlflow_db() {
  # `mlflow server` migrates a new SQLite database from its CLI process and again from its worker: on a
  # database that does not exist yet the two race ("table ... already exists"). Create it first, alone.
  [[ $MLFLOW_BACKEND == sqlite:///* ]] || return 0
  local db=${MLFLOW_BACKEND#sqlite:///}
  db=${db%%\?*}
  [[ $db == /* ]] || db=$ROOT/$db
  [[ -s $db ]] && return 0
  say "mlflow: creating the tracking database $db (once, ~20 s)"
  mkdir -p "$(dirname "$db")"
  (cd "$ROOT" && "$BIN/python" -c 'import sys; from mlflow import MlflowClient; MlflowClient(sys.argv[1]).search_experiments()' \
    "sqlite:///$db" >>"$(logfile mlflow)" 2>&1)
}

launch() {  # launch NAME CMD...: own session (so stop can end its whole process group), log, pid file
  local name=$1; shift
  local log; log=$(logfile "$name")
  [[ -f $log ]] && mv -f "$log" "$log.1"
  (cd "$ROOT" && exec setsid "$@" >"$log" 2>&1 </dev/null) &
  echo $! >"$(pidfile "$name")"
}

start_one() {
  local name=$1 pid port
  if pid=$(pid_of "$name"); then
    say "$name already running (pid $pid)"
    return 0
  fi
  port=$(port_of "$name")
  if [[ -n $port ]] && port_open "$port"; then
    say "ERROR: $HOST:$port is in use by another process; set LENS_${name^^}_PORT to a free port" >&2
    return 1
  fi
  case $name in
    prefect)
      # Log streaming on: `prefect deployment run ... --watch` then shows the flow's log lines, not only
      # state changes.
      launch prefect env PREFECT_HOME="$PREFECT_HOME_DIR" PREFECT_API_URL="$PREFECT_URL/api" \
        PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED=true PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED=true \
        "$BIN/prefect" server start --host "$HOST" --port "$PREFECT_PORT" ;;
    mlflow)
      init_mlflow_db
      launch mlflow "$BIN/mlflow" server --host "$HOST" --port "$MLFLOW_PORT" --workers 1 \
        --backend-store-uri "$MLFLOW_BACKEND" --artifacts-destination "$MLFLOW_ARTIFACTS" ;;
    deployments)
      local tracking=()
      if pid_of mlflow >/dev/null || healthy mlflow; then tracking=(LENS_TRACKING_URI="$MLFLOW_URL"); fi
      launch deployments env PREFECT_HOME="$PREFECT_HOME_DIR" PREFECT_API_URL="$PREFECT_URL/api" \
        PREFECT_LOGGING_EXTRA_LOGGERS=lens TOKENIZERS_PARALLELISM=false "${tracking[@]}" \
        "$BIN/python" infra/deployments.py serve ;;
  esac
  say "$name starting (pid $(cat "$(pidfile "$name")"), log $(logfile "$name"))"
}

wait_healthy() {
  local name=$1 t0=$SECONDS
  until healthy "$name"; do
    if ! pid_of "$name" >/dev/null; then
      say "ERROR: $name exited during start-up; last lines of $(logfile "$name"):" >&2
      tail -n 30 "$(logfile "$name")" >&2 || true
      return 1
    fi
    if (( SECONDS - t0 > TIMEOUT )); then
      say "ERROR: $name not healthy after ${TIMEOUT}s (LENS_START_TIMEOUT); see $(logfile "$name")" >&2
      return 1
    fi
    sleep 1
  done
  say "$name up after $((SECONDS - t0))s: $(url_of "$name")"
}

stop_one() {
  local name=$1 pid
  if ! pid=$(pid_of "$name"); then
    rm -f "$(pidfile "$name")"
    say "$name not running"
    return 0
  fi
  # The pid leads its own session and process group (setsid): end the group (server workers, flow runs).
  local target=$pid
  [[ $(ps -o pgid= -p "$pid" | tr -d ' ') == "$pid" ]] && target=-$pid
  kill -TERM -- "$target" 2>/dev/null || true
  for _ in $(seq 1 30); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL -- "$target" 2>/dev/null || true
  fi
  # Stragglers of the group (e.g. uvicorn workers) get the same treatment.
  [[ $target == -* ]] && kill -KILL -- "$target" 2>/dev/null || true
  rm -f "$(pidfile "$name")"
  say "$name stopped"
}

status_one() {
  local name=$1 pid
  if pid=$(pid_of "$name"); then
    if healthy "$name"; then
      say "$name running (pid $pid), healthy: $(url_of "$name")"
    else
      say "$name running (pid $pid), NOT healthy yet; log $(logfile "$name")"
      return 1
    fi
  else
    say "$name stopped"
    return 1
  fi
}

print_env() {
  echo "export PREFECT_API_URL=$PREFECT_URL/api"
  echo "export PREFECT_HOME=$PREFECT_HOME_DIR"
  echo "export MLFLOW_TRACKING_URI=$MLFLOW_URL"
}

cmd=${1:-status}
shift || true
names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=("${ALL[@]}")
for n in "${names[@]}"; do
  [[ " ${ALL[*]} " == *" $n "* ]] || { echo "unknown service $n (one of: ${ALL[*]})" >&2; exit 2; }
done

has() { [[ " ${names[*]} " == *" $1 "* ]]; }

case $cmd in
  start)
    mkdir -p "$LOGS" "$RUN" "$PREFECT_HOME_DIR"
    # The two servers start side by side (each takes tens of seconds on 2 cores), then the serving process.
    for n in prefect mlflow; do has "$n" && start_one "$n"; done
    for n in prefect mlflow; do has "$n" && wait_healthy "$n"; done
    if has deployments; then
      healthy prefect || { say "ERROR: the Prefect server at $PREFECT_URL is not up" >&2; exit 1; }
      start_one deployments
      wait_healthy deployments
    fi
    say "logs in $LOGS; stop with: infra/services.sh stop"
    ;;
  stop)
    for (( i=${#ALL[@]}-1; i>=0; i-- )); do has "${ALL[$i]}" && stop_one "${ALL[$i]}"; done
    ;;
  restart)
    "$0" stop "${names[@]}"
    exec "$0" start "${names[@]}"
    ;;
  status)
    rc=0
    for n in "${names[@]}"; do status_one "$n" || rc=3; done
    exit $rc
    ;;
  env)
    print_env
    ;;
  logs)
    for n in "${names[@]}"; do echo "==> $(logfile "$n") <=="; tail -n "${LENS_LOG_LINES:-40}" "$(logfile "$n")" 2>/dev/null || true; done
    ;;
  *)
    echo "usage: $0 start|stop|restart|status|env|logs [prefect|mlflow|deployments ...]" >&2
    exit 2
    ;;
esac
