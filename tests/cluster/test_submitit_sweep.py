"""A Hydra multirun through hydra-submitit-launcher: submitit_local runs each point as its own process, the
way submitit_slurm runs each as a Slurm job (same pickled task function, same per-point overrides)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher: the `cluster` extra")


def test_each_point_of_a_sweep_runs_as_a_submitit_job(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "params", "-m", "model.d_model=64,128", "hydra/launcher=submitit_local",
         f"output_dir={tmp_path}"], capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = sorted((tmp_path / "multirun" / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2, proc.stderr[-3000:]
    outputs = [log.read_text() for log in logs]
    assert all("Job completed successfully" in out for out in outputs), outputs
    # The two points differ: each job composed its own override (d_model 64 vs 128).
    totals = {line for out in outputs for line in out.splitlines() if "= total parameters" in line}
    assert len(totals) == 2, totals
