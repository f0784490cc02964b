#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (slurmctld + slurmd + munge), for the launch tests
# and for trying launch/rlp.sbatch locally. Debian 12's SLURM 22.05; no systemd, no cgroups.
#
#   tools/local_slurm.sh start DIR   # install the packages if missing (needs root and apt),
#                                    # write DIR/slurm.conf, start the daemons, wait for an idle node
#   tools/local_slurm.sh stop DIR    # stop the daemons this script started (their pid files)
#
# Clients (sbatch, squeue, scancel, sinfo) need SLURM_CONF=DIR/slurm.conf. Finished jobs are
# listed in DIR/jobcomp.txt (JobId=, JobState=, ExitCode=), one line each: no accounting daemon.
# Measured facts behind the configuration: ../shared/notes/slurm_local.md.
set -euo pipefail
cmd=${1:?usage: tools/local_slurm.sh start|stop DIR}
dir=$(mkdir -p "${2:?usage: tools/local_slurm.sh start|stop DIR}" && cd "$2" && pwd)

stop_pidfile() {  # stop_pidfile FILE: SIGTERM the process, wait up to 10 s, then SIGKILL
    local f=$1 pid
    [[ -f "$f" ]] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

if [[ $cmd == stop ]]; then
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    [[ -f "$dir/munged.started" ]] && stop_pidfile "$(cat "$dir/munged.started")"
    rm -f "$dir/munged.started"
    exit 0
fi
[[ $cmd == start ]] || { echo "usage: tools/local_slurm.sh start|stop DIR" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
        echo "local_slurm: SLURM is not installed and this is not a root Debian/Ubuntu machine:" \
             "install slurmctld slurmd slurm-client munge" >&2
        exit 1
    fi
    echo "local_slurm: installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge \
        >"$dir/apt.log" 2>&1 || { apt-get update -qq >>"$dir/apt.log" 2>&1 &&
        apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge \
        >>"$dir/apt.log" 2>&1; } || { tail -20 "$dir/apt.log" >&2; exit 1; }
fi

# One cluster per machine: a second slurmctld/slurmd would find the ports taken and the clients
# would talk to the first cluster.
if running=$(pgrep -x 'slurmctld|slurmd' | tr '\n' ' ') && [[ -n $running ]]; then
    echo "local_slurm: SLURM daemons already run here (pids $running); stop them first" \
         "(tools/local_slurm.sh stop THEIR_DIR)" >&2
    exit 1
fi

# munge: reuse a running munged, else start one (and remember to stop it).
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [[ -f /etc/munge/munge.key ]] || { mungekey --create 2>/dev/null ||
        /usr/sbin/create-munge-key -f >/dev/null; chown munge:munge /etc/munge/munge.key; }
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    echo /run/munge/munged.pid > "$dir/munged.started"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

host=$(hostname -s)
node=$(slurmd -C | head -n1)
mem=$(sed -nE 's/.*RealMemory=([0-9]+).*/\1/p' <<<"$node")
node=$(sed -E "s/RealMemory=[0-9]+/RealMemory=$(( mem * 9 / 10 ))/" <<<"$node")
mkdir -p "$dir/state" "$dir/spool" "$dir/log"
cat > "$dir/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
MinJobAge=600
KillWait=30
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$dir/slurm.conf
/usr/sbin/slurmctld -f "$SLURM_CONF"
/usr/sbin/slurmd -f "$SLURM_CONF"
for _ in $(seq 150); do
    [[ $(sinfo -h -o %t 2>/dev/null) == idle ]] && { echo "local_slurm: node $host idle ($SLURM_CONF)"; exit 0; }
    sleep 0.2
done
echo "local_slurm: the node did not become idle; see $dir/log" >&2
sinfo >&2 || true
exit 1
