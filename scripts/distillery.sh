#!/usr/bin/env bash
# Local operations for distillery: server | worker | deploy | demo | results | stop.
# Usage: scripts/distillery.sh demo     (what `make demo` runs)
#
# One machine runs everything with embedded defaults: a Prefect server on 127.0.0.1 with
# its SQLite database in .prefect/, a process worker on work pool "local", local Ray per
# flow run, and the artifact store in artifacts/. Processes started here are recorded in
# .run/*.pid and started in their own process group, so `stop` ends exactly those.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export DISTILLERY_HOME=$ROOT
export PREFECT_HOME=${PREFECT_HOME:-$ROOT/.prefect}
PORT=${DISTILLERY_PORT:-4200}
export PREFECT_API_URL=${PREFECT_API_URL:-http://127.0.0.1:$PORT/api}
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_API_HOST=127.0.0.1
export PREFECT_SERVER_API_PORT=$PORT
export PREFECT_UI_URL=${PREFECT_UI_URL:-http://127.0.0.1:$PORT}
export DISTILLERY_STORE=${DISTILLERY_STORE:-$ROOT/artifacts}
# A local worker may poll often (default 10 s): a scheduled run starts within ~1 s.
export PREFECT_WORKER_QUERY_SECONDS=${PREFECT_WORKER_QUERY_SECONDS:-1}
export PREFECT_WORKER_PREFETCH_SECONDS=${PREFECT_WORKER_PREFETCH_SECONDS:-5}
export PATH=$ROOT/.venv/bin:$PATH
RUN=$ROOT/.run
DEMO_DEPLOYMENT=${DISTILLERY_DEMO:-pipeline/cpu}
mkdir -p "$RUN" "$PREFECT_HOME"

alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }
healthy() { python -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "$PREFECT_API_URL" >/dev/null 2>&1; }

start_bg() {  # name, command...: own session (process group) so stop can end its children too
  local name=$1; shift
  setsid nohup "$@" >"$RUN/$name.log" 2>&1 < /dev/null &
  echo $! >"$RUN/$name.pid"
}

SERVER_READY=0
server() {
  # deploy and worker both need the server: check (and say so) once per command.
  if [ "$SERVER_READY" = 1 ]; then return; fi
  if healthy; then echo "Prefect server: reusing $PREFECT_API_URL"; SERVER_READY=1; return; fi
  alive server || start_bg server prefect server start --host 127.0.0.1 --port "$PORT"
  for _ in $(seq 1 180); do
    if healthy; then echo "Prefect server: started at $PREFECT_UI_URL (database in $PREFECT_HOME)"; SERVER_READY=1; return; fi
    alive server || break
    sleep 1
  done
  echo "Prefect server did not become healthy; last log lines:" >&2
  tail -n 30 "$RUN/server.log" >&2
  exit 1
}

deploy() {
  server
  # Deploying is idempotent but costs seconds of CLI start-up; skip it when neither the
  # deployment file nor the server's database changed since the last deploy.
  local stamp
  stamp=$( (cat deployments/prefect.yaml; echo "$PREFECT_API_URL"; stat -c '%i' "$PREFECT_HOME/prefect.db" 2>/dev/null) | sha256sum | cut -c1-16)
  if [ "${1:-}" != "--force" ] && [ "$(cat "$RUN/deployed.stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "Deployments: up to date (deployments/prefect.yaml unchanged; 'make deploy' forces)"
    return
  fi
  prefect work-pool inspect local >/dev/null 2>&1 || prefect work-pool create local --type process >/dev/null
  prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml >"$RUN/deploy.log" 2>&1 \
    || { tail -n 40 "$RUN/deploy.log" >&2; exit 1; }
  echo "$stamp" >"$RUN/deployed.stamp"
  echo "Deployed: $(grep -c '^- name:' deployments/prefect.yaml) deployments from deployments/prefect.yaml to work pool 'local'"
}

worker() {
  server
  if alive worker; then echo "Worker: reusing pid $(cat "$RUN/worker.pid")"; return; fi
  start_bg worker prefect worker start --pool local --type process
  echo "Worker: started (log $RUN/worker.log)"
}

results() {
  python -m flows.cli results
}

demo() {
  local t0 t1
  t0=$(date +%s)
  deploy
  worker
  echo "Running $DEMO_DEPLOYMENT ..."
  if [ "${DISTILLERY_RAW_EVENTS:-0}" = 1 ]; then
    prefect deployment run "$DEMO_DEPLOYMENT" --watch   # Prefect's raw event stream
  else
    python -m flows.watch run "$DEMO_DEPLOYMENT"        # one line per stage: %, ETA, key metric
  fi
  t1=$(date +%s)
  results
  echo
  echo "Demo run finished in $((t1 - t0)) s."
  echo "Datasets (train on any of them with the command below it):"
  python -m flows.cli datasets | sed 's/^/  /'
  echo "Artifacts: $DISTILLERY_STORE"
  echo "Prefect UI: $PREFECT_UI_URL  (server and worker keep running; 'make stop' ends them)"
}

stop() {
  for name in worker server; do
    if alive "$name"; then
      local pid; pid=$(cat "$RUN/$name.pid")
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -KILL -- "-$pid" 2>/dev/null || true
      echo "stopped $name (pid $pid)"
    fi
    rm -f "$RUN/$name.pid"
  done
}

case "${1:-}" in
  deploy) deploy --force ;;
  server|worker|results|demo|stop) "$1" ;;
  *) echo "usage: $0 {server|worker|deploy|demo|results|stop}" >&2; exit 2 ;;
esac
