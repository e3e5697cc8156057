"""cluster/slurm/pipeline.sbatch run under stand-ins for srun, scontrol and python: it starts a Ray head, then
a worker per other node, waits for all of them, runs the stage as the driver, forwards Slurm's USR1 to it
and requeues the job when the driver checkpointed (exit 75)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "cluster" / "slurm" / "pipeline.sbatch"

FAKES = {
    # srun [--option=value ...] command...: run the command here.
    "srun": 'while [[ "$1" == --* ]]; do shift; done; exec "$@"',
    "scontrol": 'case "$1 $2" in "show config") echo "$FAKE_CONFIG";; "show job") echo "$FAKE_JOB";; '
                'show*) echo "$FAKE_NODES" | tr " " "\\n";; '
                'requeue*) echo "requeue $2" >> "$LOG";; esac',
    "hostname": "echo 10.0.0.1",
    "python": r'''
if [ "$1 $2" = "-m ray.scripts.scripts" ]; then
  echo "ray $*" >> "$LOG"; echo "auth $RAY_AUTH_MODE $RAY_AUTH_TOKEN" >> "$LOG"; exec sleep 300
elif [ "$1" = "-c" ]; then
  echo "token-of-the-job"
elif [ "$1" = "-" ]; then
  # wait_for_nodes: like the real one, return once $3 Ray nodes have started (or after 10 s).
  cat > /dev/null
  for _ in $(seq 100); do [ "$(grep -c ' start ' "$LOG" 2>/dev/null)" -ge "$3" ] && break; sleep 0.1; done
  echo "wait for $3 nodes at $2" >> "$LOG"
elif [ "$1 $2" = "-m pipeline.cli" ]; then
  trap 'echo "driver got USR1" >> "$LOG"; exit 75' USR1
  echo "driver $*" >> "$LOG"
  [ "$FAKE_DRIVER" = "succeeds" ] && exit 0
  [ "$FAKE_DRIVER" = "fails" ] && exit 1
  for _ in $(seq 600); do sleep 0.1; done
fi''',
}


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "FAKE_NODES": "n1 n2 n3",
           "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_JOB_ID": "42", "SLURM_CPUS_PER_TASK": "8",
           "SLURM_GPUS_PER_TASK": "4", "PIPELINE_PYTHON": str(bin_dir / "python"), "HOME": str(tmp_path),
           "FAKE_CONFIG": "PreemptType = preempt/partition_prio\nSlurmctldParameters = preempt_send_user_signal",
           "FAKE_JOB": "JobId=42 JobName=pipeline\n   PreemptEligibleTime=2026-12-03T06:21:07 PreemptTime=None"}
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    return env, log


def _start(env) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(SCRIPT), "train", "model.n_layer=2", "output_dir=/shared/out"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=30)
        return proc.returncode, out
    finally:
        # The script's EXIT trap should have stopped its background steps; make sure (only this test's group).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_starts_ray_on_every_node_then_runs_the_stage(fake_slurm):
    env, log = fake_slurm
    code, out = _finish(_start({**env, "FAKE_DRIVER": "succeeds"}))
    assert code == 0, out
    lines = log.read_text().splitlines()
    (head,) = [line for line in lines if "start --head" in line]
    assert head.startswith("ray -m ray.scripts.scripts start --head --node-ip-address=10.0.0.1 --port=6379")
    assert "--num-cpus=8 --num-gpus=4" in head and "--block" in head
    workers = [line for line in lines if "start --address=10.0.0.1:6379" in line]
    assert len(workers) == 2  # n2 and n3
    # Ray starts in the background (srun steps); the script waits for the head, then for all three nodes.
    synchronous = [line for line in lines if not line.startswith(("ray ", "auth "))]
    assert synchronous == ["wait for 1 nodes at 10.0.0.1:6379", "wait for 3 nodes at 10.0.0.1:6379",
                           "driver -m pipeline.cli train model.n_layer=2 output_dir=/shared/out cluster=slurm"]
    assert "requeue" not in log.read_text()
    assert "sends no USR1 on preemption" not in out  # this Slurm sends it (preempt_send_user_signal)
    # Token authentication on every node, with the job's token from a file only its user reads.
    token = env["HOME"] + "/.ray/pipeline-42.token"
    assert [line for line in lines if line.startswith("auth ")] == ["auth token token-of-the-job"] * 3
    assert Path(token).read_text().strip() == "token-of-the-job" and os.stat(token).st_mode & 0o777 == 0o600


def test_forwards_preemption_and_requeues(fake_slurm):
    env, log = fake_slurm
    proc = _start(env)
    deadline = time.time() + 20
    while "driver" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline and proc.poll() is None, "the driver did not start"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGUSR1)  # what --signal=B:USR1@120 does
    code, out = _finish(proc)
    assert code == 75, out
    assert "driver got USR1" in log.read_text()
    assert "requeue 42" in log.read_text()
    assert "requeueing job 42" in out


def test_is_valid_bash_and_asks_slurm_for_the_signal():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text


def test_says_when_preemption_would_stop_ray_without_a_checkpoint(fake_slurm):
    """Without send_user_signal, Slurm's preemption SIGTERMs the Ray steps at once (measured on Slurm 22.05):
    the script cannot prevent it and says what the user then gets."""
    env, _ = fake_slurm
    code, out = _finish(_start({**env, "FAKE_DRIVER": "succeeds", "FAKE_CONFIG": "PreemptType = preempt/partition_prio"}))
    assert code == 0, out
    assert "sends no USR1 on preemption (PreemptParameters=send_user_signal is off)" in out
    assert "resumes from its last periodic checkpoint" in out


@pytest.mark.parametrize("preempted", [True, False])
def test_a_driver_that_fails_under_preemption_is_requeued(fake_slurm, preempted):
    """Preempted without USR1, Slurm SIGTERMs Ray under the driver, which fails; a job whose script fails ends
    FAILED and is never requeued (measured on Slurm 22.05), so the script requeues a preempted one itself. A
    failure without preemption is the run's own: not requeued."""
    env, log = fake_slurm
    job = "JobId=42\n   PreemptEligibleTime=2026-12-03T06:21:07 PreemptTime=" + ("2026-12-03T06:21:10" if preempted
                                                                                    else "None")
    code, out = _finish(_start({**env, "FAKE_DRIVER": "fails", "FAKE_JOB": job}))
    assert code == 1, out
    assert ("requeue 42" in log.read_text()) is preempted
    assert ("resumes from the last periodic checkpoint" in out) is preempted
