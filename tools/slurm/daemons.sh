# Shared by cluster-up.sh and cluster-down.sh: find and stop daemons by pid file, never by name.
# The sourcing script defines say() for its log lines.

# pid_is PID COMM: PID is alive (not a zombie) and really is COMM -- pids get recycled
pid_is() {
  local stat
  [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] || return 1
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]   # a zombie counts as gone
}
running() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && pid_is "$pid" "$2"
}

# halt PIDFILE COMM [SECONDS]: SIGTERM, wait, then SIGKILL -- only the pid named in PIDFILE
halt() {
  local file=$1 comm=$2 wait_s=${3:-15} pid i
  if ! running "$file" "$comm"; then
    rm -f "$file"
    return 0
  fi
  pid=$(cat "$file")
  say "stopping $comm (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < wait_s * 10; i++)); do
    pid_is "$pid" "$comm" || { rm -f "$file"; return 0; }   # daemons unlink their pid file early
    sleep 0.1
  done
  say "$comm (pid $pid) still alive after ${wait_s}s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$file"
}
