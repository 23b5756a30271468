# Shared by the bench and load scripts (sourced, not run): starting a
# `hearth serve` and waiting until it answers.

# wait_ready URL: returns once URL/readyz answers; fails (ending a `set -e`
# script) after 10 s, rather than letting the load run against nothing.
wait_ready() {
  for _ in $(seq 1 200); do
    curl -fsS "$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "no hearth answered at $1/readyz" >&2
  return 1
}

# serve_on PORT DATA_DIR [FLAGS...]: starts "$hearth" serve on 127.0.0.1:PORT
# in the background (HEARTH_LOG=warn unless set), sets `server` to its pid,
# exports HEARTH_URL, and waits until it is ready.
serve_on() {
  local port="$1" data="$2"
  shift 2
  HEARTH_LOG="${HEARTH_LOG:-warn}" "$hearth" serve --listen "127.0.0.1:$port" --data-dir "$data" "$@" >/dev/null &
  server=$!
  export HEARTH_URL="http://127.0.0.1:$port"
  wait_ready "$HEARTH_URL"
}

# stop_server: stops the server serve_on started and waits for it to exit.
stop_server() {
  kill -TERM "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  server=""
}
