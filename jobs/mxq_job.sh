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
  MXQ=${MXQ:-${SLURM_SUBMIT_DIR:-$PWD}/build/mxq}
  [ -x "$MXQ" ] || mxq_job_fail "no mxq binary at '$MXQ': set MXQ, or submit from the repository after 'bash scripts/setup.sh'"
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
# Runs when Slurm's warning signal (or a time-limit SIGTERM) reaches the batch
# shell: forwards SIGUSR1, which mxq takes as "stop at the next safe point"
# (srun and mpirun both pass it on to every rank).
mxq_job_on_signal() {
  echo "mxq-job: $1 at $(date '+%F %T'): stopping mxq at its next safe point, then requeueing"
  MXQ_JOB_STOPPED=1
  if [ -n "${MXQ_JOB_PID:-}" ]; then kill -USR1 "$MXQ_JOB_PID" 2>/dev/null || true; fi
}

# mxq_job_run VERB ARGS...: launch mxq VERB on the job's tasks, echoing the
# command; returns mxq's exit status. If the job was signalled and mxq did not
# finish, requeues the job (when allowed) and exits the batch script.
mxq_job_run() {
  local cmd=("${MXQ_LAUNCH[@]}" "$MXQ" "$@") rc=0
  echo "mxq-job: command: ${cmd[*]}"
  trap 'mxq_job_on_signal SIGUSR1' USR1
  trap 'mxq_job_on_signal SIGTERM' TERM
  "${cmd[@]}" &
  MXQ_JOB_PID=$!
  # `wait` returns early when a trapped signal arrives: wait again until the
  # launcher itself has exited.
  while :; do
    wait "$MXQ_JOB_PID" && rc=0 || rc=$?
    kill -0 "$MXQ_JOB_PID" 2>/dev/null || break
  done
  MXQ_JOB_PID=
  trap - USR1 TERM
  echo "mxq-job: exit status $rc at $(date '+%F %T')"
  if [ "$MXQ_JOB_STOPPED" = 1 ] && [ "$rc" -ne 0 ]; then
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
  echo "mxq-job: scontrol requeue $SLURM_JOB_ID (the run continues with --resume)"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    echo "mxq-job: scontrol requeue failed (does the cluster allow requeues?): resubmit with MXQ_RESUME=1"
    exit 75
  fi
  exit 0
}
