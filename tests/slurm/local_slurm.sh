#!/usr/bin/env bash
# A private single-node Slurm on localhost for the tests: its own munge key
# and socket, its own ports, state and logs, all under DIR. Nothing in /etc
# is read or changed, and no daemon outlives `stop`.
#
#   tests/slurm/local_slurm.sh start DIR   start munged, slurmctld, slurmd; wait until the node is idle;
#                                          print "export SLURM_CONF=DIR/slurm.conf"
#   tests/slurm/local_slurm.sh stop DIR    stop the three daemons by the PIDs recorded in DIR
#
# Needs Debian's slurm-wlm and munge (scripts/test.sh installs them).
set -euo pipefail
cmd=${1:-}
DIR=${2:-}
if [ -z "$cmd" ] || [ -z "$DIR" ]; then echo "usage: $0 start|stop DIR" >&2; exit 2; fi

stop_pid() { # stop_pid FILE: TERM, then KILL after 10 s
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

if [ "$cmd" = stop ]; then
  # Jobs first, so that none outlives its slurmd.
  if [ -f "$DIR/slurm.conf" ] && [ -f "$DIR/slurmctld.pid" ]; then
    SLURM_CONF=$DIR/slurm.conf timeout 10 scancel --quiet --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 50); do
      [ -z "$(SLURM_CONF=$DIR/slurm.conf timeout 5 squeue -h -t running,completing 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  stop_pid "$DIR/slurmd.pid"
  stop_pid "$DIR/slurmctld.pid"
  stop_pid "$DIR/munged.pid"
  exit 0
fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }

for tool in munged slurmctld slurmd sbatch scontrol sinfo; do
  command -v "$tool" >/dev/null || { echo "local_slurm: '$tool' is not installed (Debian: slurm-wlm munge)" >&2; exit 3; }
done
mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool"
chmod 700 "$DIR/munge"
chmod 711 "$DIR"
head -c 1024 /dev/urandom >"$DIR/munge/key"
chmod 600 "$DIR/munge/key"
munged --force --socket="$DIR/munge/socket" --key-file="$DIR/munge/key" --log-file="$DIR/munge/log" \
  --pid-file="$DIR/munged.pid" --seed-file="$DIR/munge/seed"

# Two free ports at a random base (nothing answers on them), so that this
# Slurm meets no other daemon; a port taken between this check and the
# daemons' start makes the start fail, and the caller sees it.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for _ in $(seq 50); do
  port=$((20000 + RANDOM % 20000))
  if ! listening "$port" && ! listening $((port + 1)); then break; fi
done
node=$(hostname -s)
cat >"$DIR/slurm.conf" <<CONF
ClusterName=mxqtest
SlurmctldHost=$node(127.0.0.1)
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
ReturnToService=2
KillWait=30
MinJobAge=3600
JobRequeue=1
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=mxq Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$DIR/slurm.conf
# In the foreground (-D) of a background job, so that their PIDs are ours.
slurmctld -D -f "$SLURM_CONF" >"$DIR/slurmctld.log" 2>&1 &
echo $! >"$DIR/slurmctld.pid"
slurmd -D -f "$SLURM_CONF" >"$DIR/slurmd.log" 2>&1 &
echo $! >"$DIR/slurmd.pid"
for _ in $(seq 300); do
  if [ "$(sinfo -h -o %t 2>/dev/null)" = idle ]; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.1
done
echo "local_slurm: the node did not become idle in 30 s; logs in $DIR" >&2
tail -5 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
"$0" stop "$DIR"
exit 1
