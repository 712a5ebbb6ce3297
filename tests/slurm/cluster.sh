#!/usr/bin/env bash
# A real Slurm cluster on this one machine: munged, slurmctld and two slurmd ("orch-node1",
# "orch-node2", 127.0.0.2/127.0.0.3) started by hand, without systemd or cgroups.
#
#   tests/slurm/cluster.sh start   # install Debian's packages if missing, start, wait for idle nodes
#   tests/slurm/cluster.sh stop    # stop only the daemons this script started (pid files)
#   tests/slurm/cluster.sh env     # print `export SLURM_CONF=...` for a shell that wants sbatch/squeue
#
# Everything lives under $ORCHESTRA_SLURM_DIR (default /tmp/orchestra-slurm): config, state, logs,
# pid files and a private munge socket, so a munged or Slurm already on the machine is left alone.
# Clients find the cluster through SLURM_CONF=$ORCHESTRA_SLURM_DIR/slurm.conf.
# Needs root (daemons, apt-get, /etc/hosts). Facts behind the choices: ../../../shared/notes/environment.md.
set -euo pipefail

DIR=${ORCHESTRA_SLURM_DIR:-/tmp/orchestra-slurm}
CTL_PORT=${ORCHESTRA_SLURM_CTL_PORT:-16817}
NODE_PORT=${ORCHESTRA_SLURM_NODE_PORT:-17001}   # node1 uses it, node2 the next one
NODES=(orch-node1 orch-node2)
ADDRS=(127.0.0.2 127.0.0.3)
HOSTS_MARK="# orchestra-test-cluster"
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

log() { echo "cluster.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$DIR/apt.log" 2>&1 || die "apt-get update failed (see $DIR/apt.log)"
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >>"$DIR/apt.log" 2>&1 \
        || die "apt-get install failed (see $DIR/apt.log)"
    # The packages may start their own daemons through an init system; this script runs its own.
}

add_hosts() {
    # Torch's rendezvous resolves MASTER_ADDR=orch-node1, and slurmd -N needs its name to resolve.
    local i
    for i in "${!NODES[@]}"; do
        grep -qE "^${ADDRS[$i]}[[:space:]]+${NODES[$i]}([[:space:]]|$)" /etc/hosts \
            || echo "${ADDRS[$i]} ${NODES[$i]} $HOSTS_MARK" >>/etc/hosts
    done
}

remove_hosts() {
    # Only the lines this script added; /etc/hosts may be a bind mount, so rewrite in place.
    if grep -q "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
        local kept
        kept=$(grep -v "$HOSTS_MARK" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts
    fi
}

write_config() {
    local host cpus
    host=$(hostname -s)
    cpus=$(nproc)
    cat >"$CONF" <<EOF
# Written by tests/slurm/cluster.sh: a controller and two slurmd on one host.
ClusterName=orchestra-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTL_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire + 1 s before it starts again (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
# No cgroups or systemd here.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=${NODES[0]} NodeHostname=$host NodeAddr=${ADDRS[0]} Port=$NODE_PORT CPUs=$cpus State=UNKNOWN
NodeName=${NODES[1]} NodeHostname=$host NodeAddr=${ADDRS[1]} Port=$((NODE_PORT + 1)) CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (daemons, apt-get, /etc/hosts)"
    mkdir -p "$DIR"
    chmod 0755 "$DIR"  # munged checks every directory above its socket
    if alive "$DIR/slurmctld.pid"; then
        log "already running (SLURM_CONF=$CONF)"
        wait_idle
        return 0
    fi
    install_packages
    rm -rf "$DIR/state" "$DIR/spool"
    mkdir -p "$DIR/state" "$DIR/munge" "${NODES[@]/#/$DIR/spool/}"
    add_hosts
    write_config

    # munged refuses to run as root: run it as the munge user on a private socket.
    chown munge:munge "$DIR/munge"
    chmod 0755 "$DIR/munge"  # munged demands a world-executable socket dir
    [[ -f /etc/munge/munge.key ]] || { mungekey --create 2>/dev/null || create-munge-key -f; }
    runuser -u munge -- munged --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" \
        || die "munged did not start (see $DIR/munge/munged.log)"
    cp "$DIR/munge/munged.pid" "$DIR/munged.pid"

    slurmctld -f "$CONF" || die "slurmctld did not start (see $DIR/slurmctld.log)"
    local node
    for node in "${NODES[@]}"; do
        slurmd -f "$CONF" -N "$node" || die "slurmd -N $node did not start (see $DIR/slurmd-$node.log)"
    done
    wait_idle
    log "up: ${NODES[*]} idle; export SLURM_CONF=$CONF"
}

wait_idle() {
    local i states
    for i in $(seq 1 60); do
        states=$(sinfo -h -N -o '%N %T' 2>/dev/null || true)
        if [[ $(grep -c ' idle$' <<<"$states") -eq ${#NODES[@]} ]]; then
            return 0
        fi
        sleep 0.5
    done
    die "nodes not idle after 30 s: ${states:-no answer from slurmctld} (logs in $DIR)"
}

stop_pidfile() {
    local pidfile=$1 pid i
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
}

stop() {
    local node
    if alive "$DIR/slurmctld.pid"; then
        # Jobs still running would leave their processes behind once slurmd is gone.
        scancel --full --quiet --partition=debug 2>/dev/null || true
        sleep 1
    fi
    for node in "${NODES[@]}"; do
        stop_pidfile "$DIR/slurmd-$node.pid"
    done
    stop_pidfile "$DIR/slurmctld.pid"
    stop_pidfile "$DIR/munged.pid"
    rm -f "$DIR/munge/munged.pid"
    remove_hosts
    log "stopped"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
