"""Sweep planning, the shape rule, and the `pipeline scaling` commands on a CSV of runs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.config import ConfigError, ModelConfig, PipelineConfig, SweepConfig, TrainConfig, validate_sweep
from pipeline.model.size import count_parameters
from pipeline.scaling.fit_inputs import ScalingPoint, write_points_csv
from pipeline.scaling.sweep import plan_points, shape_for_width


def test_shape_rule_keeps_aspect_ratio_and_head_size():
    sweep = SweepConfig(aspect_ratio=32, head_dim=16)
    shape = shape_for_width(ModelConfig(), 96, sweep)
    assert (shape.n_layer, shape.n_head, shape.d_ff, shape.name) == (3, 6, 384, "d96")
    assert shape_for_width(ModelConfig(), 16, sweep).n_layer == 1


def test_isoflop_plan_spends_each_budget():
    sweep = SweepConfig(name="t", budgets_flops=[1e11, 3e11], d_models=[16, 32, 64])
    cfg = PipelineConfig(model=ModelConfig(context_length=64), train=TrainConfig(global_batch_tokens=1024), sweep=sweep)
    points = plan_points(cfg, vocab_size=1024)
    assert len(points) == 6
    for p in points:
        assert p.n_params == count_parameters(p.model).total
        assert p.tokens == p.steps * 1024
        assert p.compute == pytest.approx(p.budget, rel=0.02)  # rounding to whole steps
    sizes = {p.n_params for p in points}
    assert len(sizes) == 3


def test_sweep_validation_names_the_problem():
    with pytest.raises(ConfigError, match="sweep=<name>"):
        validate_sweep(SweepConfig())
    with pytest.raises(ConfigError, match="budgets_flops"):
        validate_sweep(SweepConfig(name="x", d_models=[32]))
    grid = SweepConfig(name="x", budgets_flops=[1e11, 3e11], d_models=[16, 32, 64])
    validate_sweep(dataclasses.replace(grid, point=5))
    with pytest.raises(ConfigError, match=r"sweep.point=6 is outside .* 6 points: use 0 .. 5"):
        validate_sweep(dataclasses.replace(grid, point=6))


def test_fit_sweep_reads_the_child_runs_from_mlflow_and_logs_to_the_parent(tmp_path):
    """The MLflow side of a sweep without training: child runs carrying N, D, C and the final loss, as
    `pipeline sweep` records them, are gathered by sweep id or parent run id, fitted, and the fit, intervals,
    predictions and plots land on the parent run."""
    from mlflow.tracking import MlflowClient
    from scaling_synthetic import TRUE, isoflop_points

    from pipeline.scaling.gather import gather_points
    from pipeline.scaling.sweep import fit_sweep, open_parent
    from pipeline.tracking import tracking_uri

    cfg = PipelineConfig(output_dir=str(tmp_path), sweep=SweepConfig(name="s", predict_flops=[1e21], n_bootstrap=30))
    parent = open_parent(cfg, "s-0123abcd", [])
    assert open_parent(cfg, "s-0123abcd", []).run_id == parent.run_id  # a second point job finds the same parent
    client = MlflowClient(tracking_uri(cfg.tracking, cfg.output_dir))
    experiment = client.get_run(parent.run_id).info.experiment_id
    rng = np.random.default_rng(0)
    points = [dataclasses.replace(p, loss=p.loss * np.exp(rng.normal(0, 0.002)))
              for p in isoflop_points(budgets=(1e18, 1e19, 1e20), sizes=5)]
    for i, p in enumerate(points):
        child = client.create_run(experiment, run_name=f"s-0123abcd-{i}",
                                  tags={"mlflow.parentRunId": parent.run_id, "sweep_id": "s-0123abcd"})
        for key, value in {"N": p.N, "N_nonembedding": 0.9 * p.N, "D": p.D, "C": 6 * p.N * p.D, "C_budget": p.C,
                           "final_val_loss": p.loss}.items():
            client.log_metric(child.info.run_id, key, value, step=1)
        client.set_terminated(child.info.run_id)
    client.create_run(experiment, run_name="unrelated")  # not a child: ignored

    gathered = gather_points(tracking_uri(cfg.tracking, cfg.output_dir), "s-0123abcd")
    assert len(gathered) == len(points) and all(g.N_nonembedding == pytest.approx(0.9 * g.N) for g in gathered)
    for name in ("s-0123abcd", parent.run_id):  # by sweep id or by parent run id
        report = fit_sweep(cfg, name)
        assert report["approach3"]["alpha"] == pytest.approx(TRUE["alpha"], rel=0.05)  # 15 noisy points
    run = client.get_run(parent.run_id)
    m = run.data.metrics
    for name in ("E", "alpha", "beta"):  # the report's numbers, with their bootstrap intervals
        assert m[f"fit_{name}"] == pytest.approx(report["approach3"][name])
        assert m[f"fit_{name}_lo"] < m[f"fit_{name}"] < m[f"fit_{name}_hi"]
    assert m["pred_N_opt_C1e21"] > 0 and m["pred_N_opt_C1e21_lo"] <= m["pred_N_opt_C1e21"] <= m["pred_N_opt_C1e21_hi"]
    assert {"approach2_a", "approach2_a_lo", "approach2_a_hi", "kaplan_alpha_N", "kaplan_alpha_C"} <= set(m)
    assert run.data.tags["sweep_id"] == "s-0123abcd" and run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.run_id, "scaling")}
    assert {f"scaling/{n}" for n in ("scaling_fit.json", "points.csv", "loss_vs_n.png", "isoflop.png",
                                      "frontier.png")} <= artifacts


def test_scaling_fit_and_predict_commands_on_a_csv(tmp_path):
    true = dict(E=2.0, A=300.0, B=900.0, alpha=0.35, beta=0.3)
    rng = np.random.default_rng(3)
    points = []
    for C in (1e17, 1e18, 1e19):
        for N in (C / 6) ** 0.5 * np.logspace(-0.8, 0.8, 5):
            D = C / (6 * N)
            loss = true["E"] + true["A"] / N ** true["alpha"] + true["B"] / D ** true["beta"]
            points.append(ScalingPoint(N, D, loss * np.exp(rng.normal(0, 0.001)), C=C))
    write_points_csv(points, tmp_path / "runs.csv")
    out = tmp_path / "out"
    fit = subprocess.run([sys.executable, "-m", "pipeline.cli", "scaling", "fit", f"csv={tmp_path / 'runs.csv'}",
                          f"output_dir={out}", "C=1e21"], capture_output=True, text=True, timeout=300)
    assert fit.returncode == 0, fit.stderr
    assert "approach 3" in fit.stdout and "approach 2" in fit.stdout
    report = json.loads((out / "scaling" / "runs" / "scaling_fit.json").read_text())
    assert report["approach3"]["alpha"] == pytest.approx(0.35, rel=0.05)
    assert {"loss_vs_n.png", "isoflop.png", "frontier.png"} <= set(report["plots"])
    for png in report["plots"]:
        assert (out / "scaling" / "runs" / png).stat().st_size > 1000
    predict = subprocess.run([sys.executable, "-m", "pipeline.cli", "scaling", "predict", "C=1e21", f"output_dir={out}"],
                             capture_output=True, text=True, timeout=120)
    assert predict.returncode == 0, predict.stderr
    assert "N_opt=" in predict.stdout and "[" in predict.stdout


@pytest.mark.distributed
def test_hydra_multirun_trains_each_point_as_its_own_job_under_one_parent(tmp_path):
    """`pipeline sweep -m ... sweep.point=range(n)`: every Hydra job trains one point (real training through Ray
    and DeepSpeed), all points are children of one parent run, and the job that finishes the grid fits it."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "sweep", "-m", "sweep=isoflop_tiny", "sweep.point=range(2)",
         "sweep.budgets_flops=[1e9]", "sweep.d_models=[4,8]", "eval.max_tokens=4096", f"output_dir={out}"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 of 2 points finished" in proc.stdout  # the first job leaves the fit to the last one
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert all({"N", "N_nonembedding", "D", "C", "final_val_loss"} <= set(r.data.metrics) for r in children)
    assert {r.data.metrics["N"] for r in children} == {2556, 5496}
    sweep_id = parents[0].data.tags["sweep_id"]
    report = json.loads((out / "scaling" / sweep_id / "scaling_fit.json").read_text())
    assert report["n_points"] == 2  # fitted by the second job (too few points for approach 3, said so)
    assert "at least 5 runs" in report["approach3"]["error"]
