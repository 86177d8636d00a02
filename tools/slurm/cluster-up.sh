#!/usr/bin/env bash
# cluster-up.sh -- bring up a real SLURM cluster on this machine for mmtrain's tests and CI:
# munge, MariaDB, slurmdbd (accounting, so `sacct` works), slurmctld and slurmd, with fake GPUs
# exposed as GRES. Node `localhost` (partition `debug`, the default) runs on the machine itself;
# SLURM_NODES more nodes `mmnode1..N` (partition `multi`) each run in their own network and UTS
# namespace with their own address, slurmd and sshd (tools/slurm/nodes.sh), for multi-node jobs.
# Debian 12 (slurm-wlm 22.05), run as root, no systemd needed.
#
# Safe to run repeatedly: packages are installed only when missing, daemons are started only
# when not running, and slurmctld+slurmd are restarted when slurm.conf / gres.conf change.
#
# Knobs (environment):
#   SLURM_FAKE_GPUS   fake GPUs on each node, as GRES gpu (default 4; 0 = no GRES)
#   SLURM_CPUS        CPUs each node declares; may exceed the real cores (default 8)
#   SLURM_NODES       namespace nodes mmnode1..N in partition multi (default 0: only localhost);
#                     fewer than before removes the extra ones
#   SLURM_NODE_NET    the /24 of their private bridge, as its first three numbers (default 10.213.0)
#   SLURM_MEM_MB      RealMemory of the node in MB (default: 90% of MemTotal)
#   SLURM_CLUSTER     ClusterName, also registered in the accounting DB (default mmtrain)
#   SLURM_UP_TIMEOUT  seconds to wait for each daemon and for the node to go idle (default 60)
#   SLURM_CRED_EXPIRE job credential lifetime in seconds; it is also how long a requeued job
#                     stays ineligible before it can start again (default 10; Slurm's own is 120)
#
# Logs: /var/log/slurm/{slurmctld,slurmd-NODE,slurmdbd,mariadb}.log, /var/log/munge/munged.log,
# install log /var/log/slurm/apt-install.log. Stop with tools/slurm/cluster-down.sh.
set -euo pipefail

FAKE_GPUS=${SLURM_FAKE_GPUS:-4}
NODE_CPUS=${SLURM_CPUS:-8}
CLUSTER=${SLURM_CLUSTER:-mmtrain}
UP_TIMEOUT=${SLURM_UP_TIMEOUT:-60}
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-10}
NODES=${SLURM_NODES:-0}
NODE_NET=${SLURM_NODE_NET:-10.213.0}
NODE_MEM=${SLURM_MEM_MB:-$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)}

NODE=localhost
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
CTLD_STATE=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=mmtrain-local-only
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server iproute2 util-linux
          openssh-server openssh-client pdsh)

CTLD_PID=$RUN_DIR/slurmctld.pid
DBD_PID=$RUN_DIR/slurmdbd.pid
MARIADB_PID=/run/mysqld/mariadbd.pid
MUNGED_PID=/run/munge/munged.pid

STARTED_AT=$EPOCHREALTIME
elapsed() { LC_ALL=C awk -v a="$STARTED_AT" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
say() { echo "[cluster-up $(elapsed)s] $*"; }
die() { echo "cluster-up: ERROR: $*" >&2; exit 1; }

for knob in FAKE_GPUS NODE_CPUS UP_TIMEOUT CRED_EXPIRE NODE_MEM NODES; do
  [[ ${!knob} =~ ^[0-9]+$ ]] || die "$knob must be a non-negative integer, got '${!knob}'"
done
[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts system daemons); try: sudo $0"

# ----------------------------------------------------------------------------- helpers
source "$(dirname "$0")/daemons.sh"
source "$(dirname "$0")/nodes.sh"
SLURMD_PID=$(node_pidfile "$NODE")

# await WHAT CMD...: poll CMD every 0.2 s for up to UP_TIMEOUT seconds
await() {
  local what=$1 deadline=$((SECONDS + UP_TIMEOUT))
  shift
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      echo "cluster-up: timed out after ${UP_TIMEOUT}s waiting for $what" >&2
      show_logs
      exit 1
    fi
    sleep 0.2
  done
}

show_logs() {
  local f
  for f in "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd-*.log "$LOG_DIR"/slurmdbd.log \
           "$LOG_DIR"/mariadb.log /var/log/munge/munged.log; do
    [ -s "$f" ] || continue
    echo "----- last lines of $f" >&2
    tail -n 25 "$f" >&2
  done
}

# ----------------------------------------------------------------------------- packages
TEMP_POLICY=
remove_temp_policy() { if [ -n "$TEMP_POLICY" ]; then rm -f "$TEMP_POLICY"; TEMP_POLICY=; fi; }
trap remove_temp_policy EXIT

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f '${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  say "installing ${missing[*]}"
  mkdir -p "$LOG_DIR"
  local apt_log=$LOG_DIR/apt-install.log policy=/usr/sbin/policy-rc.d
  # no init system here: keep the packages' postinst from trying to start the daemons
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# temporary, from mmtrain tools/slurm/cluster-up.sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    TEMP_POLICY=$policy
  fi
  local rc=0
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"
  } >"$apt_log" 2>&1 || rc=$?
  remove_temp_policy
  if ((rc)); then
    echo "cluster-up: package installation failed (exit $rc); last lines of $apt_log:" >&2
    tail -n 40 "$apt_log" >&2
    exit 1
  fi
  say "packages installed"
}

# ----------------------------------------------------------------------------- files
make_dirs_and_devices() {
  mkdir -p "$CONF_DIR" "$LOG_DIR" "$RUN_DIR" "$CTLD_STATE" "$SLURMD_SPOOL"
  chmod 755 "$CTLD_STATE" "$SLURMD_SPOOL"
  # Slurm only needs the GRES File= paths to exist; use NVIDIA's char major where mknod is allowed
  local i
  for ((i = 0; i < FAKE_GPUS; i++)); do
    [ -e "/dev/fakegpu$i" ] || mknod -m 666 "/dev/fakegpu$i" c 195 "$i" 2>/dev/null ||
      touch "/dev/fakegpu$i"
  done
}

# install_if_changed NEW DEST MODE: returns 0 if DEST was (re)written
install_if_changed() {
  if cmp -s "$1" "$2"; then
    rm -f "$1"
    chmod "$3" "$2"
    return 1
  fi
  mv -f "$1" "$2"
  chmod "$3" "$2"
  return 0
}

SLURM_CONF_CHANGED=0
DBD_CONF_CHANGED=0
write_configs() {
  local gres_types='' node_gres='' gres_file ctld_addr='' node_lines='' i
  if ((FAKE_GPUS > 0)); then
    gres_types='GresTypes=gpu'
    node_gres="Gres=gpu:$FAKE_GPUS"
  fi
  # the namespace nodes reach the controller through the bridge, not through their own loopback
  ((NODES == 0)) || ctld_addr="SlurmctldAddr=$(bridge_addr)"
  # localhost comes last: while a node named localhost is the only one defined, Slurm 22.05 answers
  # every node-name lookup with it, and the next node would be refused as a duplicate of itself
  for ((i = 1; i <= NODES; i++)); do
    node_lines+="NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") CPUs=$NODE_CPUS RealMemory=$NODE_MEM"
    node_lines+=" $node_gres State=UNKNOWN"$'\n'
  done
  local multi_partition=''
  ((NODES == 0)) || multi_partition="PartitionName=multi Nodes=$(multi_nodes) MaxTime=INFINITE State=UP"

  cat >"$CONF_DIR/slurm.conf.tmp" <<EOF
# Generated by mmtrain tools/slurm/cluster-up.sh -- edits are overwritten on the next run.
ClusterName=$CLUSTER
SlurmctldHost=$NODE
$ctld_addr
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=$CRED_EXPIRE
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
StateSaveLocation=$CTLD_STATE
SlurmdSpoolDir=$SLURMD_SPOOL/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true

# scheduling: fast turnaround for tests
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
# 22.05 only honours kill_invalid_depend here (not in SchedulerParameters)
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
PreemptType=preempt/none
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
Waittime=0
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=30
# let the node declare more CPUs than the machine has
SlurmdParameters=config_overrides

# accounting through slurmdbd (sacct), GPU counts recorded as TRES gres/gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$NODE
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
$gres_types

${node_lines}NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$NODE_MEM $node_gres State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
$multi_partition
EOF

  if ((FAKE_GPUS > 1)); then
    gres_file="/dev/fakegpu[0-$((FAKE_GPUS - 1))]"
  else
    gres_file=/dev/fakegpu0
  fi
  {
    echo "# Generated by mmtrain tools/slurm/cluster-up.sh"
    echo "AutoDetect=off"
    if ((FAKE_GPUS > 0)); then
      echo "NodeName=$NODE Name=gpu File=$gres_file"
      ((NODES == 0)) || echo "NodeName=$(multi_nodes) Name=gpu File=$gres_file"
    fi
  } >"$CONF_DIR/gres.conf.tmp"

  cat >"$CONF_DIR/slurmdbd.conf.tmp" <<EOF
# Generated by mmtrain tools/slurm/cluster-up.sh
AuthType=auth/munge
DbdHost=$NODE
SlurmUser=root
PidFile=$DBD_PID
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=$DB_NAME
StorageUser=$DB_USER
StoragePass=$DB_PASS
EOF

  install_if_changed "$CONF_DIR/slurm.conf.tmp" "$CONF_DIR/slurm.conf" 644 && SLURM_CONF_CHANGED=1
  install_if_changed "$CONF_DIR/gres.conf.tmp" "$CONF_DIR/gres.conf" 644 && SLURM_CONF_CHANGED=1
  install_if_changed "$CONF_DIR/slurmdbd.conf.tmp" "$CONF_DIR/slurmdbd.conf" 600 && DBD_CONF_CHANGED=1
  return 0
}

# ----------------------------------------------------------------------------- daemons
munge_ok() { munge -n </dev/null | unmunge >/dev/null; }

start_munge() {
  mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    mungekey --create --force 2>/dev/null ||
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  running "$MUNGED_PID" munged && munge_ok 2>/dev/null && return 0
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged --force   # writes $MUNGED_PID itself
  await munged munge_ok
}

start_mariadb() {
  mkdir -p /run/mysqld
  chown mysql:mysql /run/mysqld
  if running "$MARIADB_PID" mariadbd; then
    :
  elif mysqladmin ping >/dev/null 2>&1; then
    say "using the MariaDB server that is already running (cluster-down.sh will not stop it)"
  else
    if [ ! -d /var/lib/mysql/mysql ]; then
      say "initialising the MariaDB data directory"
      mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$LOG_DIR/mariadb-install.log" 2>&1 ||
        { tail -n 20 "$LOG_DIR/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    fi
    say "starting mariadbd"
    # mariadbd drops to user mysql before opening its error log
    touch "$LOG_DIR/mariadb.log"
    chown mysql:mysql "$LOG_DIR/mariadb.log"
    # mariadbd does not daemonise: detach it into its own session
    setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql \
      --socket=/run/mysqld/mysqld.sock --pid-file="$MARIADB_PID" \
      --bind-address=127.0.0.1 --innodb-buffer-pool-size=64M --innodb-log-file-size=64M \
      --innodb-lock-wait-timeout=900 --log-error="$LOG_DIR/mariadb.log" \
      </dev/null >/dev/null 2>&1 &
    await "mariadbd to accept connections" mysqladmin ping
  fi
  mysql -u root <<EOF
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
EOF
}

start_slurmdbd() {
  if ((DBD_CONF_CHANGED)) && running "$DBD_PID" slurmdbd; then
    say "slurmdbd.conf changed: restarting slurmdbd"
    halt "$DBD_PID" slurmdbd
  fi
  if ! running "$DBD_PID" slurmdbd; then
    say "starting slurmdbd"
    /usr/sbin/slurmdbd
  fi
  await slurmdbd sacctmgr -n list cluster
  if ! sacctmgr -n -P list cluster format=Cluster | grep -qx "$CLUSTER"; then
    say "registering cluster $CLUSTER in the accounting database"
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
}

check_cluster_name() {
  local saved=$CTLD_STATE/clustername
  if [ -s "$saved" ] && [ "$(cat "$saved")" != "$CLUSTER" ]; then
    die "slurmctld state in $CTLD_STATE belongs to cluster '$(cat "$saved")', not '$CLUSTER';" \
        "run tools/slurm/cluster-down.sh --purge first (or keep SLURM_CLUSTER=$(cat "$saved"))"
  fi
}

start_slurm() {
  local i name
  if ((SLURM_CONF_CHANGED)) && { running "$CTLD_PID" slurmctld || any_slurmd_running; }; then
    # node CPUs/GRES are not picked up by `scontrol reconfigure`: restart every daemon
    say "slurm.conf/gres.conf changed: restarting slurmctld and every slurmd"
    for name in $NODE $(existing_nodes); do halt "$(node_pidfile "$name")" slurmd; done
    halt "$CTLD_PID" slurmctld
  fi
  if ! running "$CTLD_PID" slurmctld; then
    say "starting slurmctld"
    /usr/sbin/slurmctld
    await slurmctld scontrol ping
  fi
  if ! running "$SLURMD_PID" slurmd; then
    say "starting slurmd of $NODE"
    /usr/sbin/slurmd -N "$NODE"
  fi
  for ((i = 1; i <= NODES; i++)); do start_node_slurmd "$i"; done
  for ((i = 1; i <= NODES; i++)); do start_node_sshd "$i"; done
}

any_slurmd_running() {
  local name
  for name in $NODE $(existing_nodes); do running "$(node_pidfile "$name")" slurmd && return 0; done
  return 1
}

# The namespace nodes: as many as NODES asks, each with its address and its name in /etc/hosts.
nodes_network() {
  local name i
  for name in $(existing_nodes); do
    [[ $name =~ ^mmnode([0-9]+)$ ]] && ((BASH_REMATCH[1] <= NODES)) || node_remove "$name"
  done
  if ((NODES == 0)); then
    bridge_remove
    ssh_client_remove
  else
    check_node_net
    bridge_up
    for ((i = 1; i <= NODES; i++)); do netns_up "$i"; done
    ssh_up
  fi
  hosts_block_write
}

node_state() { sinfo -h -N -n "$1" -o '%T' 2>/dev/null | head -n 1; }

# wait_node_ready NAME: the node registered and is idle (resumed once if it came back down/drained)
wait_node_ready() {
  local node=$1 deadline=$((SECONDS + UP_TIMEOUT)) state resumed=0
  while :; do
    state=$(node_state "$node")
    case $state in
      idle | mixed | allocated | completing) return 0 ;;
      down* | drain* | fail*)
        # e.g. "Node unexpectedly rebooted" after a restart
        if ((resumed == 0)) && scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1; then
          say "node $node was $state: resumed"
          resumed=1
        fi ;;
    esac
    if ((SECONDS >= deadline)); then
      echo "cluster-up: node $node not ready after ${UP_TIMEOUT}s (state '${state:-unknown}')" >&2
      scontrol show node "$node" >&2 || true
      show_logs
      exit 1
    fi
    sleep 0.2
  done
}

# ----------------------------------------------------------------------------- main
install_packages
make_dirs_and_devices
check_cluster_name
write_configs
start_munge
start_mariadb
start_slurmdbd
nodes_network
start_slurm
wait_node_ready "$NODE"
for ((i = 1; i <= NODES; i++)); do wait_node_ready "$(node_name "$i")"; done
printf 'cluster up in %.1fs: cluster=%s nodes=%s state=%s cpus=%s gpus=%s mem=%sMB (each)\n' \
  "$(elapsed)" "$CLUSTER" "$(sinfo -h -N -o '%N' | sort -u | paste -sd, -)" "$(node_state "$NODE")" \
  "$NODE_CPUS" "$FAKE_GPUS" "$NODE_MEM"
