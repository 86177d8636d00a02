#!/usr/bin/env bash
# cluster-down.sh -- stop the SLURM cluster started by tools/slurm/cluster-up.sh.
#
#   cluster-down.sh           cancel all jobs, stop every slurmd, slurmctld, slurmdbd, mariadbd,
#                             munged; remove the namespace nodes (their processes, sshd, links and
#                             namespaces), the bridge, the nodes' block in /etc/hosts and their
#                             ssh client drop-in (the nodes' keys stay in /etc/ssh/mmtrain-nodes)
#   cluster-down.sh --purge   the same, then delete the controller/slurmd state, the logs in
#                             /var/log/slurm and the accounting database (next up = fresh cluster)
#
# Daemons are stopped only through their pid files, after checking /proc/PID/comm; nothing is
# ever killed by process name. Packages and /etc/slurm configs are left in place.
set -uo pipefail

PURGE=0
for arg in "$@"; do
  case $arg in
    --purge) PURGE=1 ;;
    -h | --help) sed -n '2,12s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "cluster-down: unknown argument '$arg' (use --purge or --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "cluster-down: ERROR: must run as root" >&2; exit 1; }

LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurm/slurmctld.pid
RUN_DIR=/run/slurm
DBD_PID=/run/slurm/slurmdbd.pid
MARIADB_PID=/run/mysqld/mariadbd.pid
MUNGED_PID=/run/munge/munged.pid
DB_NAME=slurm_acct_db

say() { echo "[cluster-down] $*"; }

die() { echo "cluster-down: ERROR: $*" >&2; exit 1; }

source "$(dirname "$0")/daemons.sh"
source "$(dirname "$0")/nodes.sh"

# 1. cancel every job so no job processes outlive slurmd, and let the records reach slurmdbd
if running "$CTLD_PID" slurmctld && command -v squeue >/dev/null; then
  jobs=$(squeue -h -o '%A' 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    say "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    for ((i = 0; i < 150; i++)); do
      [ -z "$(squeue -h -t RUNNING,COMPLETING,PENDING,CONFIGURING -o '%A' 2>/dev/null)" ] && break
      sleep 0.1
    done
  fi
fi

# 2. daemons, in the reverse order of cluster-up.sh
halt "$(node_pidfile localhost)" slurmd
for node in $(existing_nodes); do node_remove "$node"; done
bridge_remove
ssh_client_remove
NODES=0 hosts_block_write
halt "$CTLD_PID" slurmctld
halt "$DBD_PID" slurmdbd
if ((PURGE)) && running "$MARIADB_PID" mariadbd; then
  say "dropping the accounting database $DB_NAME"
  mysql -u root -e "DROP DATABASE IF EXISTS $DB_NAME;" || say "WARNING: could not drop $DB_NAME"
fi
halt "$MARIADB_PID" mariadbd 60
halt "$MUNGED_PID" munged

# 3. state and logs
if ((PURGE)); then
  say "deleting controller/slurmd state and $LOG_DIR"
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/* "${LOG_DIR:?}"/*
fi
say "cluster stopped$( ((PURGE)) && echo ' and purged')"
exit 0
