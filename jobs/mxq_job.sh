# Sourced by the jobs/*.sbatch scripts: what every mxq batch job does.
#   - threads from the allocation (OPENBLAS_NUM_THREADS = OMP_NUM_THREADS =
#     SLURM_CPUS_PER_TASK);
#   - launch with `srun --mpi=pmix` (MXQ_LAUNCHER=srun, the default) or with
#     Open MPI's `mpirun`, which reads the Slurm allocation (MXQ_LAUNCHER=mpirun);
#   - echo the mxq version and the exact command into the job's log;
#   - near the time limit (sbatch --signal=B:USR1@SECONDS), stop mxq at its
#     next safe point and requeue the job, at most MXQ_MAX_REQUEUES times
#     (default 10); the requeued job runs again with its resume option.
# Not a script of its own: `source jobs/mxq_job.sh` from a batch script.

mxq_job_fail() { echo "mxq-job: error: $*" >&2; exit 2; }

# MXQ: the mxq binary. sbatch runs a copy of the batch script from Slurm's
# spool, so paths are taken from the submit directory, not the script's.
mxq_job_setup() {
  MXQ=${MXQ:-${MXQ_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/build/mxq}
  [ -x "$MXQ" ] || mxq_job_fail "no mxq binary at '$MXQ': set MXQ (or MXQ_ROOT), or submit from the repository after 'bash scripts/setup.sh'"
  export OPENBLAS_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
  export OMP_NUM_THREADS=$OPENBLAS_NUM_THREADS
  export OMPI_MCA_btl_vader_single_copy_mechanism=${OMPI_MCA_btl_vader_single_copy_mechanism:-none}
  if [ "$(id -u)" -eq 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  fi
  case ${MXQ_LAUNCHER:=srun} in
    srun) MXQ_LAUNCH=(srun --mpi=pmix) ;;
    mpirun) MXQ_LAUNCH=(mpirun -n "${SLURM_NTASKS:-1}") ;;
    *) mxq_job_fail "MXQ_LAUNCHER must be srun or mpirun, not '$MXQ_LAUNCHER'" ;;
  esac
  echo "mxq-job: $("$MXQ" --version) at $MXQ; job ${SLURM_JOB_ID:-none}, restart ${SLURM_RESTART_COUNT:-0}," \
       "${SLURM_NTASKS:-1} tasks x $OPENBLAS_NUM_THREADS threads on ${SLURM_JOB_NODELIST:-$(hostname)}"
}

# Whether this run continues an earlier one of the same job: Slurm counts
# requeues in SLURM_RESTART_COUNT; MXQ_RESUME=1 asks for it by hand.
mxq_job_is_restart() { [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] || [ "${MXQ_RESUME:-0}" = 1 ]; }

MXQ_JOB_STOPPED=0
MXQ_JOB_PID=
# Runs when Slurm's warning signal (or a time-limit SIGTERM) reaches the batch
# shell, at any time of the job: forwards SIGUSR1 to a running mxq, which
# takes it as "stop at the next safe point" (srun and mpirun both pass it on
# to every rank); between two steps, the next step is not started.
mxq_job_on_signal() {
  echo "mxq-job: $1 at $(date '+%F %T'): stopping mxq at its next safe point; the job is requeued if it stops there"
  echo "mxq-job: (a time limit's warning, or scancel: after scancel the job ends here, its log may stop short)"
  MXQ_JOB_STOPPED=1
  if [ -n "$MXQ_JOB_PID" ]; then kill -USR1 "$MXQ_JOB_PID" 2>/dev/null || true; fi
}
trap 'mxq_job_on_signal SIGUSR1' USR1
trap 'mxq_job_on_signal SIGTERM' TERM

# mxq_job_run VERB ARGS...: launch mxq VERB on the job's tasks, echoing the
# command; returns mxq's exit status. If a stop was asked for and mxq stopped
# (exit 75, MXQ_EXIT_STOPPED) or had not started, requeues the job (when
# allowed) and exits the batch script; any other failure is returned as it is.
mxq_job_run() {
  local cmd=("${MXQ_LAUNCH[@]}" "$MXQ" "$@") rc=0
  if [ "$MXQ_JOB_STOPPED" = 1 ]; then
    echo "mxq-job: not starting '${cmd[*]}': the job was asked to stop"
    mxq_job_requeue
  fi
  # quoted as a shell would need it, so that the line can be run again
  echo "mxq-job: command:$(printf ' %q' "${cmd[@]}")"
  "${cmd[@]}" &
  MXQ_JOB_PID=$!
  # Poll rather than `wait` alone: a trapped signal interrupts `wait` (status
  # above 128) and the launcher's own status could then be lost. bash reaps
  # the launcher when it exits; `wait` then returns its status.
  while kill -0 "$MXQ_JOB_PID" 2>/dev/null; do
    sleep 1
  done
  wait "$MXQ_JOB_PID" && rc=0 || rc=$?
  MXQ_JOB_PID=
  echo "mxq-job: exit status $rc at $(date '+%F %T')"
  if [ "$MXQ_JOB_STOPPED" = 1 ] && [ "$rc" -eq 75 ]; then
    mxq_job_requeue
  fi
  return "$rc"
}

mxq_job_requeue() {
  local max=${MXQ_MAX_REQUEUES:-10}
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "mxq-job: not a Slurm job: run the same command again with --resume"
    exit 75
  fi
  if [ "${SLURM_RESTART_COUNT:-0}" -ge "$max" ]; then
    echo "mxq-job: already requeued $max times (MXQ_MAX_REQUEUES): not requeueing; resubmit with MXQ_RESUME=1"
    exit 75
  fi
  echo "mxq-job: scontrol requeue $SLURM_JOB_ID (the job runs again: quantize continues with --resume, eval starts over)"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    echo "mxq-job: scontrol requeue failed (does the cluster allow requeues?): resubmit with MXQ_RESUME=1"
    exit 75
  fi
  exit 0
}

# The words of an options variable (MXQ_ARGS, ...) into the array named $1,
# split on blanks, never glob-expanded.
mxq_job_words() {
  local -n into=$1
  read -r -a into <<<"${2:-}"
}
