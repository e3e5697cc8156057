#!/usr/bin/env bash
# Preempt a real training job of cluster/slurm/pipeline.sbatch and report what survived. Needs a Slurm where a job
# in partition $HIGH preempts one in $LOW on the same node(s), e.g. the one of cluster/slurm/one-node-slurm.sh.
#
#   bash cluster/slurm/check-preemption.sh          # from the repository root, the project installed in .venv
#
# Submits `train` (tiny model, a periodic checkpoint every 100 steps) to $LOW, waits until it reaches step
# $PREEMPT_AT, submits a job to $HIGH that needs the node, then waits until the requeued job has resumed. Prints
# the step of the checkpoint it resumed from: $PREEMPT_AT or just after it when Slurm sent USR1 on preemption
# (the run checkpointed), the last multiple of 100 when it did not (the run lost the steps since).
set -euo pipefail
LOW=${LOW:-low}
HIGH=${HIGH:-high}
PREEMPT_AT=${PREEMPT_AT:-150}
CPUS=${CPUS:-$(nproc)}
OUT=${OUT:-$PWD/preemption-check}
export PIPELINE_PYTHON=${PIPELINE_PYTHON:-$PWD/.venv/bin/python}
rm -rf "$OUT"
mkdir -p "$OUT"
# Ray's files under $OUT: a `ray start` elsewhere on this machine is not joined by mistake.
job=$(sbatch --parsable --partition="$LOW" --nodes=1 --cpus-per-task="$CPUS" --output="$OUT/job-%j.out" \
  --chdir="$PWD" --export=ALL,RAY_TMPDIR="$OUT/ray",RAY_WAIT_S=120 cluster/slurm/pipeline.sbatch train \
  output_dir="$OUT" train.max_steps=2000 train.eval_interval_steps=0 train.save_interval_steps=100)
log=$OUT/job-$job.out
echo "job $job in $LOW: $log"
until grep -q "step $PREEMPT_AT/" "$log" 2>/dev/null; do
  state=$(squeue -h -j "$job" -o %T)
  [ -n "$state" ] || { echo "job $job ended before step $PREEMPT_AT" >&2; exit 1; }
  sleep 1
done
high=$(sbatch --parsable --partition="$HIGH" --nodes=1 --cpus-per-task="$CPUS" --output="$OUT/high-%j.out" --wrap "sleep 5")
echo "step $PREEMPT_AT reached at $(date +%T): job $high in $HIGH preempts it"
until grep -q "resumed from" "$log" 2>/dev/null; do
  if [ -z "$(squeue -h -j "$job" -o %T)" ]; then
    echo "job $job ended without being requeued: $(scontrol show job "$job" | grep -o 'JobState=[^ ]*')" >&2
    exit 1
  fi
  sleep 2
done
grep -E "preempt|requeue|checkpointed|resumed from" "$log" | grep -v "PreemptionWatcher" | sed 's/\x1b\[[0-9;]*m//g'
scancel "$job"
echo "preempted at step $PREEMPT_AT; $(grep -o 'resumed from .* at step [0-9]*' "$log" | tail -1)"
