# Sourced by the sbatch scripts in this folder (not run on its own): starts the training step on every
# node of the allocation, passes preemption signals on to it, and exits with its exit code.
#
# Set before sourcing: CONFIG (recipe), TASKS (per_gpu | per_node), optionally GPUS_PER_NODE, ARGS
# (extra lor2c-train arguments, an array), LOR2C_TRAIN (the command, default lor2c-train).
set -uo pipefail

TASKS=${TASKS:-per_gpu}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
[ "$GPUS_PER_NODE" -gt 0 ] 2>/dev/null || GPUS_PER_NODE=${SLURM_NTASKS_PER_NODE:-1}  # no GPUs: one rank per task
read -ra TRAIN <<< "${LOR2C_TRAIN:-lor2c-train}"
ARGS=("${ARGS[@]+"${ARGS[@]}"}")
# Rendezvous: lor2c-train resolves the first node's address itself (scontrol show hostnames, then
# its NodeAddr) in each task; the port comes from the job id, identical on every node.
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export LOR2C_SLURM_TASKS=$TASKS
export PYTHONUNBUFFERED=1

case $TASKS in
    per_gpu)   # one srun task per GPU; each task is one rank (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS)
        STEP=(srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks-per-node="$GPUS_PER_NODE"
              "${TRAIN[@]}" --config "$CONFIG" "${ARGS[@]+"${ARGS[@]}"}") ;;
    per_node)  # one srun task per node; lor2c-train starts GPUS_PER_NODE ranks there (node rank SLURM_NODEID)
        STEP=(srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks-per-node=1
              "${TRAIN[@]}" --config "$CONFIG" --set "nproc=$GPUS_PER_NODE" "${ARGS[@]+"${ARGS[@]}"}") ;;
    *) echo "TASKS must be per_gpu or per_node, got '$TASKS'" >&2; exit 2 ;;
esac

echo "$(date -u +%FT%TZ) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
     "$SLURM_NNODES node(s) x $GPUS_PER_NODE rank(s), $TASKS, port $MASTER_PORT"

# srun runs in the background so that this shell can run its traps: B:USR1 (--signal) and SIGTERM reach
# only this shell; they are passed to srun, which passes them to every task. The ranks stop together at
# the next step boundary, write a checkpoint, and rank 0 requeues the job (scontrol requeue).
TRAPPED=0
forward() {
    TRAPPED=1
    echo "$(date -u +%FT%TZ) batch shell: SIG$1, passing it to the training step"
    kill -s "$1" "$SRUN_PID" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
"${STEP[@]}" &
SRUN_PID=$!
while :; do
    TRAPPED=0
    wait "$SRUN_PID"
    RC=$?
    [ "$TRAPPED" = 1 ] || break  # wait returned because srun ended, not because of a trap
done
echo "$(date -u +%FT%TZ) training step exited with $RC"
exit "$RC"
