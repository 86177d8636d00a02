# Shared by cluster-up.sh and cluster-down.sh: the cluster's extra compute nodes, each a network
# namespace `mmtrain-NODE` with its own hostname (UTS namespace, held by its slurmd), its own address
# on the private bridge mmtrain-br0 and its own slurmd. The filesystem, munge and the controller are
# shared, as on a real cluster with a shared file system. Names resolve through a marked block in
# /etc/hosts. Only the addresses of the bridge's /24 (NODE_NET) are used, and only inside these
# namespaces and on the bridge. Each node also runs an sshd (root, by a dedicated key only), so that
# launchers that start ranks over ssh (the deepspeed launcher's pdsh) reach the nodes as on a cluster.
# The sourcing script defines say() and die() and sources daemons.sh.

BRIDGE=mmtrain-br0
NETNS_PREFIX=mmtrain-
HOSTS_BEGIN="# mmtrain-slurm-nodes begin (tools/slurm/cluster-up.sh; removed by cluster-down.sh)"
HOSTS_END="# mmtrain-slurm-nodes end"

node_name() { echo "mmnode$1"; }                    # node_name I: the I-th node (1-based)
node_addr() { echo "$NODE_NET.$((10 + $1))"; }      # node_addr I: its address on the bridge
bridge_addr() { echo "$NODE_NET.1"; }
node_pidfile() { echo "$RUN_DIR/slurmd-$1.pid"; }  # slurm.conf: SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
node_veth() { echo "mmt-$1"; }                      # host end of the node's link (<= 15 characters)
node_sshd_pidfile() { echo "$RUN_DIR/sshd-$1.pid"; }

# The nodes' ssh: their host key, root's key pair for them, the sshd config, and the client side
# (a drop-in of /etc/ssh/ssh_config that only matches the nodes' names; removed with the nodes).
SSH_DIR=/etc/ssh/mmtrain-nodes
SSH_CLIENT_CONF=/etc/ssh/ssh_config.d/mmtrain-nodes.conf

# The nodes that exist now, whatever NODES says (namespaces named mmtrain-*).
existing_nodes() { ip netns list 2>/dev/null | awk -v p="$NETNS_PREFIX" 'index($1, p) == 1 { print substr($1, length(p) + 1) }'; }

check_node_net() {
  [[ $NODE_NET =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] ||
    die "SLURM_NODE_NET must be the first three numbers of a /24 (like 10.213.0), got '$NODE_NET'"
  local used
  used=$(ip -o -4 addr show | awk -v b="$BRIDGE" '$2 != b { print $2, $4 }' | grep -F " $NODE_NET." || true)
  [ -z "$used" ] || die "SLURM_NODE_NET=$NODE_NET is already in use on this machine ($used); pick another /24"
}

bridge_up() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    say "creating bridge $BRIDGE ($(bridge_addr)/24)"
    ip link add "$BRIDGE" type bridge
  fi
  ip -4 addr show dev "$BRIDGE" | grep -qF " $(bridge_addr)/24" || ip addr add "$(bridge_addr)/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
}

# netns_up I: the I-th node's namespace, link and address (idempotent)
netns_up() {
  local name ns veth addr
  name=$(node_name "$1") ns=$NETNS_PREFIX$(node_name "$1") veth=$(node_veth "$(node_name "$1")") addr=$(node_addr "$1")
  if ! ip netns list | awk '{ print $1 }' | grep -qx "$ns"; then
    say "creating node $name: namespace $ns, address $addr"
    ip netns add "$ns"
  fi
  if ! ip link show "$veth" >/dev/null 2>&1; then
    ip -n "$ns" link del eth0 2>/dev/null || true
    ip link add "$veth" type veth peer name eth0 netns "$ns"
  fi
  ip link set "$veth" master "$BRIDGE" up
  ip -n "$ns" -4 addr show dev eth0 | grep -qF " $addr/24" || ip -n "$ns" addr add "$addr/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
}

# hosts_block_write: /etc/hosts gets one marked block naming the nodes (NODES of them; none = no block).
# Rewritten in place, not renamed: /etc/hosts is often a bind mount.
hosts_block_write() {
  local kept i
  kept=$(awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b { skip = 1; next } $0 == e { skip = 0; next } !skip' /etc/hosts)
  {
    printf '%s\n' "$kept"
    if ((NODES > 0)); then
      echo "$HOSTS_BEGIN"
      for ((i = 1; i <= NODES; i++)); do echo "$(node_addr "$i") $(node_name "$i")"; done
      echo "$HOSTS_END"
    fi
  } >/etc/hosts.mmtrain.tmp
  cmp -s /etc/hosts.mmtrain.tmp /etc/hosts || cat /etc/hosts.mmtrain.tmp >/etc/hosts
  rm -f /etc/hosts.mmtrain.tmp
}

# in_node I CMD...: CMD in the I-th node's network namespace, under the node's hostname
in_node() {
  local name
  name=$(node_name "$1")
  shift
  nsenter --net="/run/netns/$NETNS_PREFIX$name" unshare --uts -- \
    sh -c 'hostname "$1" && shift && exec "$@"' sh "$name" "$@"
}

# start_node_slurmd I: slurmd of the I-th node inside its namespace, under its own hostname
start_node_slurmd() {
  local name
  name=$(node_name "$1")
  running "$(node_pidfile "$name")" slurmd && return 0
  say "starting slurmd of $name"
  in_node "$1" /usr/sbin/slurmd -N "$name"
}

# ssh_up: the nodes' host key and root's key for them (made once), the sshd config, and what the ssh
# client needs to reach the nodes without a password or a host-key prompt. Running sshds restart when
# their config changed.
ssh_up() {
  local key name
  mkdir -p "$SSH_DIR" /run/sshd "$(dirname "$SSH_CLIENT_CONF")"
  chmod 755 "$SSH_DIR"
  for key in host root; do
    [ -s "$SSH_DIR/${key}_ed25519" ] ||
      ssh-keygen -q -t ed25519 -N '' -C "mmtrain cluster nodes ($key)" -f "$SSH_DIR/${key}_ed25519"
  done
  cp "$SSH_DIR/root_ed25519.pub" "$SSH_DIR/authorized_keys"
  echo "$(node_name '*'),$NODE_NET.* $(cut -d' ' -f1,2 "$SSH_DIR/host_ed25519.pub")" >"$SSH_DIR/known_hosts"
  cat >"$SSH_CLIENT_CONF.tmp" <<EOF
# Generated by mmtrain tools/slurm/cluster-up.sh (removed by cluster-down.sh): root reaches the
# cluster's namespace nodes with its own key and knows their host key.
Host $(node_name '*')
  IdentityFile $SSH_DIR/root_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile $SSH_DIR/known_hosts
  StrictHostKeyChecking yes
  BatchMode yes
EOF
  mv -f "$SSH_CLIENT_CONF.tmp" "$SSH_CLIENT_CONF"
  chmod 644 "$SSH_CLIENT_CONF"
  cat >"$SSH_DIR/sshd_config.tmp" <<EOF
# Generated by mmtrain tools/slurm/cluster-up.sh: the sshd of each namespace node (ListenAddress and
# PidFile are given per node on the command line). Root only, by the key in authorized_keys.
Port 22
HostKey $SSH_DIR/host_ed25519
AuthorizedKeysFile $SSH_DIR/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
X11Forwarding no
PrintMotd no
PrintLastLog no
EOF
  if install_if_changed "$SSH_DIR/sshd_config.tmp" "$SSH_DIR/sshd_config" 644; then
    for name in $(existing_nodes); do halt "$(node_sshd_pidfile "$name")" sshd; done
  fi
  return 0
}

# start_node_sshd I: the I-th node's sshd, listening on the node's address only
start_node_sshd() {
  local name pidfile
  name=$(node_name "$1")
  pidfile=$(node_sshd_pidfile "$name")
  running "$pidfile" sshd && return 0
  say "starting sshd of $name"
  in_node "$1" /usr/sbin/sshd -f "$SSH_DIR/sshd_config" -o "ListenAddress=$(node_addr "$1")" \
    -o "PidFile=$pidfile" -E "$LOG_DIR/sshd-$name.log"
}

# ssh_client_remove: the client drop-in goes with the nodes (the keys stay, as the Slurm configs do)
ssh_client_remove() { rm -f "$SSH_CLIENT_CONF"; }

# node_kill NAME: every process of the node (its slurmd, job steps, tasks) gets SIGKILL
node_kill() {
  local pids
  pids=$(ip netns pids "$NETNS_PREFIX$1" 2>/dev/null | tr '\n' ' ')
  [ -z "${pids// /}" ] && return 0
  say "killing the processes of node $1: $pids"
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
}

# node_remove NAME: its processes, link and namespace
node_remove() {
  local veth
  veth=$(node_veth "$1")
  halt "$(node_pidfile "$1")" slurmd
  halt "$(node_sshd_pidfile "$1")" sshd
  node_kill "$1"
  ip link del "$veth" 2>/dev/null || true
  ip netns del "$NETNS_PREFIX$1" 2>/dev/null || true
  rm -rf "/var/spool/slurmd/$1"
  say "removed node $1"
}

bridge_remove() {
  ip link show "$BRIDGE" >/dev/null 2>&1 || return 0
  ip link del "$BRIDGE"
  say "removed bridge $BRIDGE"
}

multi_nodes() { if ((NODES == 1)); then node_name 1; else echo "$(node_name '')[1-$NODES]"; fi; }
