"""The scaling loop: plan a grid around a prior's optimum, WSD branches, recommend a model, validate it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ModelConfig, PipelineConfig, SweepConfig, SweepRun, TrainConfig, wsd_decay_start
from pipeline.scaling.approach3 import ChinchillaFit
from pipeline.scaling.fit_inputs import ScalingPoint
from pipeline.scaling.sweep_plan import (
    PRIORS,
    WidthLattice,
    load_fit,
    plan_grid,
    recommend,
    size_targets,
)


def tiny_cfg(**sweep) -> PipelineConfig:
    return PipelineConfig(model=ModelConfig(context_length=64, vocab_size=512),
                          train=TrainConfig(global_batch_tokens=1024, lr=3e-3),
                          sweep=SweepConfig(name="t", aspect_ratio=32, head_dim=4, **sweep))


def published(name: str) -> ChinchillaFit:
    return ChinchillaFit(**PRIORS[name], objective=0.0, n_points=0)


@pytest.mark.parametrize("prior", ["chinchilla", "epoch"])
@pytest.mark.parametrize("sizes,span", [(5, 1.0), (3, 0.5), (4, 1.5)])
def test_planned_grid_brackets_each_budgets_predicted_optimum(prior, sizes, span):
    cfg = tiny_cfg()
    budgets = [1e10, 3e10, 1e11, 3e11]
    runs = plan_grid(cfg, published(prior), budgets, vocab_size=512, sizes=sizes, span=span)
    lattice = WidthLattice(cfg.model, cfg.sweep, 512)
    for C in budgets:
        mine = [r for r in runs if r.budget == C]
        n_opt = published(prior).compute_optimal(C)[0]
        ns = sorted(r.n_params for r in mine)
        assert len(ns) >= 3 and len(set(ns)) == len(ns)
        assert ns[0] <= n_opt <= ns[-1], (C, ns, n_opt)
        for r in mine:
            assert r.n_params == lattice.params(r.width)  # exact counts of the built model
            assert r.tokens == r.steps * 1024 and r.compute == pytest.approx(C, rel=0.02)
            assert r.lr == pytest.approx(3e-3 * min(x.width for x in runs) / r.width)  # the width rule
    # Neighbouring budgets share sizes (what WSD branches exploit): half a decade of C moves N* by ~0.23 decades.
    widths = [{r.width for r in runs if r.budget == C} for C in budgets]
    assert all(a & b for a, b in zip(widths, widths[1:], strict=False))


def test_size_targets_sit_on_one_lattice_around_the_optimum():
    for n_opt in (1e4, 3.3e7, 2e11):
        targets = size_targets(n_opt, 5, 1.0)
        steps = np.diff(np.log10(targets))
        assert steps == pytest.approx([0.25] * 4)
        assert np.log10(targets) / 0.25 == pytest.approx(np.round(np.log10(targets) / 0.25))  # shared lattice
        assert targets[0] <= n_opt <= targets[-1]


def test_planned_grid_at_gpt_scale_uses_the_default_shape_rule():
    cfg = PipelineConfig(model=ModelConfig(context_length=2048),
                         train=TrainConfig(global_batch_tokens=2048 * 512),
                         sweep=SweepConfig(name="t", aspect_ratio=128, head_dim=128))
    runs = plan_grid(cfg, published("chinchilla"), [1e20, 1e21], vocab_size=50257, sizes=5, span=1.0)
    for C in (1e20, 1e21):
        ns = sorted(r.n_params for r in runs if r.budget == C)
        assert ns[0] <= published("chinchilla").compute_optimal(C)[0] <= ns[-1]
    assert all(r.width % 128 == 0 for r in runs)


def test_mup_gives_every_width_the_same_learning_rate():
    cfg = tiny_cfg()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mup_base_width=8))
    runs = plan_grid(cfg, published("chinchilla"), [1e10, 1e11], vocab_size=512)
    assert {r.lr for r in runs} == {3e-3}


def test_plan_command_writes_a_sweep_config_that_pipeline_sweep_composes(tmp_path):
    """The printed command's config directory and sweep name compose (through Hydra, as `pipeline sweep` does)
    into sweep.kind=points holding exactly the planned runs, which plan_points turns into the grid."""
    from pipeline.scaling.sweep import plan_points

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "scaling", "plan", "C_min=1e10", "C_max=1e11",
                           "budgets=3", "sizes=4", "name=myplan", "peak_tflops=0.1", "sweep=isoflop_tiny",
                           f"output_dir={out}"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "estimated wall time" in proc.stdout and "as WSD branches" in proc.stdout
    config_dir = out / "scaling" / "configs"
    assert f"pipeline sweep --config-dir {config_dir} sweep=myplan" in proc.stdout
    shown = subprocess.run([sys.executable, "-m", "pipeline.cli", "sweep", "--config-dir", str(config_dir),
                            "sweep=myplan", f"output_dir={out}", "--cfg", "job"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    import yaml

    composed = yaml.safe_load(shown.stdout)
    assert composed["sweep"]["kind"] == "points" and composed["sweep"]["branches"] is True
    assert composed["train"]["schedule"] == "wsd" and composed["model"]["context_length"] == 64
    runs = composed["sweep"]["runs"]
    assert len(runs) >= 9 and len({r["budget_flops"] for r in runs}) == 3
    from pipeline.compose import compose_config

    cfg = compose_config(["sweep=isoflop_tiny", f"output_dir={out}"], stage="params")
    cfg = dataclasses.replace(cfg, sweep=SweepConfig(**{**composed["sweep"], "runs": [SweepRun(**r) for r in runs]}),
                              train=dataclasses.replace(cfg.train, schedule="wsd"))
    points = plan_points(cfg, 512)
    assert sorted(p.tokens for p in points) == sorted(r["tokens"] for r in runs)
    assert sum(p.branch_from is not None for p in points) >= 3  # shared sizes become branches


def test_wsd_branch_rule_accepts_only_a_length_change_before_both_decays():
    from pipeline.checkpoint.resume import is_wsd_branch

    def math(max_steps, **train):
        return {"model": {"d_model": 8}, "train": {"schedule": "wsd", "decay_fraction": 0.2, "warmup_steps": 3,
                                                   "max_steps": max_steps, **train}}

    long, short = math(100), math(40)
    assert wsd_decay_start(40, 0.2) == 32
    assert is_wsd_branch(long, short, 32) and is_wsd_branch(long, short, 10)
    assert not is_wsd_branch(long, short, 33)  # the short run would already be decaying
    assert not is_wsd_branch(long, math(40, warmup_steps=4), 10)  # another difference than the length
    assert not is_wsd_branch(math(100, schedule="cosine"), math(40, schedule="cosine"), 10)
    assert not is_wsd_branch(math(100), math(200), 90)  # past the saved run's own decay start (80)


def test_fork_checkpoint_links_a_complete_tag_and_refuses_an_incomplete_one(tmp_path):
    from pipeline.checkpoint.layout import CheckpointError, complete_tags, fork_checkpoint

    tag = tmp_path / "trunk" / "checkpoints" / "step_00000024"
    (tag / "global_step24").mkdir(parents=True)
    (tag / "global_step24" / "model.pt").write_bytes(b"weights")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        fork_checkpoint(tag, tmp_path / "branch")
    (tag / "COMPLETE").write_text("{}")
    forked = fork_checkpoint(tag, tmp_path / "branch")
    assert complete_tags(forked.parent) == ["step_00000024"]
    assert (forked / "global_step24" / "model.pt").stat().st_ino == (tag / "global_step24" / "model.pt").stat().st_ino
    assert fork_checkpoint(tag, tmp_path / "branch") == forked  # idempotent: a rerun keeps the branch's copy


def synthetic_fit_dir(tmp_path: Path, true: dict, budgets, noise: float = 0.003, n_bootstrap: int = 60) -> Path:
    """A scaling_fit.json fitted on a planned grid whose losses come from known parameters."""
    from pipeline.scaling.report import write_report

    prior = ChinchillaFit(**true, objective=0.0, n_points=0)
    runs = plan_grid(tiny_cfg(), prior, budgets, vocab_size=512, sizes=5, span=1.0)
    rng = np.random.default_rng(0)
    points = [ScalingPoint(r.n_params, r.tokens, float(prior.loss(r.n_params, r.tokens)) * np.exp(rng.normal(0, noise)),
                           C=r.budget) for r in runs]
    write_report(points, tmp_path / "synthetic", [1e12], n_bootstrap=n_bootstrap)
    return tmp_path / "synthetic"


def test_recommend_from_a_fit_on_synthetic_data_finds_the_known_optimum(tmp_path):
    """plan -> (synthetic) sweep -> fit -> recommend: the recommended model is the shape-rule width nearest the
    true optimum, and the true loss at the recommended N and D lies in the predicted interval."""
    true = dict(E=1.5, A=300.0, B=600.0, alpha=0.35, beta=0.3)
    fit, path = load_fit(str(synthetic_fit_dir(tmp_path, true, [1e10, 3e10, 1e11, 3e11])))
    assert path.name == "scaling_fit.json" and fit.bootstrap_params
    truth = ChinchillaFit(**true, objective=0.0, n_points=0)
    cfg = tiny_cfg()
    rec = recommend(cfg, fit, 1e12, base_width=8)
    n_true = truth.compute_optimal(1e12)[0]
    lo, hi = rec.intervals["N_opt"]
    assert lo <= n_true <= hi
    lattice = WidthLattice(cfg.model, cfg.sweep, 512)
    assert abs(np.log(rec.n_params / n_true)) <= abs(np.log(lattice.params(lattice.nearest(n_true)) / n_true)) + 0.35
    assert rec.tokens == rec.steps * 1024 and rec.lr == pytest.approx(3e-3 * 8 / rec.model.d_model)
    assert rec.loss_interval[0] <= truth.loss(rec.n_params, rec.tokens) <= rec.loss_interval[1]


def test_recommend_command_writes_a_config_that_pipeline_train_composes(tmp_path):
    true = dict(E=1.5, A=300.0, B=600.0, alpha=0.35, beta=0.3)
    fit_dir = synthetic_fit_dir(tmp_path, true, [1e10, 3e10, 1e11], n_bootstrap=20)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "scaling", "recommend", "C=3e11",
                           f"fit={fit_dir / 'scaling_fit.json'}", "sweep=isoflop_tiny", f"output_dir={out}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "predicted validation loss" in proc.stdout and "+recommended=opt-C3e11" in proc.stdout
    shown = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--config-dir",
                            str(out / "scaling" / "configs"), "+recommended=opt-C3e11", f"output_dir={out}",
                            "--cfg", "job"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    import yaml

    composed = yaml.safe_load(shown.stdout)
    fit, _ = load_fit(str(fit_dir))
    from pipeline.compose import compose_config

    rec = recommend(compose_config(["sweep=isoflop_tiny"], stage="params"), fit, 3e11)
    assert composed["model"]["d_model"] == rec.model.d_model and composed["model"]["n_layer"] == rec.model.n_layer
    assert composed["train"]["max_steps"] == rec.steps and composed["run_name"] == "opt-C3e11"
    assert composed["data"]["tokenizer"]["vocab_size"] == 512  # the setting of the overrides it was planned with


def test_validation_summary_says_inside_or_by_how_much_it_missed():
    from pipeline.scaling.commands import validation_summary

    base = {"C": 1e11, "N": 1000, "D": 5000, "predicted_loss": 5.0, "predicted_loss_lo": 4.9, "predicted_loss_hi": 5.1}
    assert "inside the interval" in validation_summary(base | {"measured_loss": 5.05, "inside": 1.0, "miss": 0.0})
    text = validation_summary(base | {"measured_loss": 5.3, "inside": 0.0, "miss": 0.2})
    assert "outside, 0.2000 nats" in text and "above it" in text


def test_plan_refuses_a_bad_range_and_an_unknown_prior(tmp_path):
    for args, message in ((["C_min=1e11", "C_max=1e10"], "must be positive and below"),
                          (["C=1e10", "prior=nonsense"], "neither a published prior"),
                          ([], "give the compute range")):
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "scaling", "plan", *args,
                               f"output_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert json.dumps(PRIORS)  # the published priors are plain numbers


@pytest.mark.distributed
def test_the_loop_end_to_end_on_shakespeare(tmp_path):
    """plan -> sweep (real training, WSD branches) -> fit -> recommend -> validate on the tiny model: the points
    are children of one parent, shorter budgets of a size are decay branches of its longest run (less compute
    than separate runs), and the validation's predicted and measured loss land on the parent run with the
    verdict printed."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    common = ["parallel.num_workers=1", "eval.max_tokens=4096", "sweep.n_bootstrap=40", f"output_dir={out}"]

    def cli(*args: str, timeout: int = 900) -> str:
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    cli("scaling", "plan", "C=1e9", "C=3e9", "sizes=3", "span=0.6", "name=loop", "peak_tflops=0.1", "sweep=isoflop_tiny",
        *common)
    swept = cli("sweep", "--config-dir", str(out / "scaling" / "configs"), *common, "sweep=loop", timeout=1500)
    assert "approach 3" in swept
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("sweep_id"))
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) >= 5 and all({"N", "D", "final_val_loss", "epochs", "C_spent"} <= set(r.data.metrics)
                                      for r in children)
    branches = [r for r in children if "wsd_branch_of" in r.data.tags]
    assert branches and all(r.data.metrics["C_spent"] < 0.3 * r.data.metrics["C"] for r in branches)
    m = parent.data.metrics
    assert m["sweep_compute_flops"] < m["separate_runs_compute_flops"]

    validated = cli("scaling", "validate", "C=2e9", "fit=latest", "sweep=isoflop_tiny", *common)
    assert "predicted loss" in validated and ("inside the interval" in validated or "outside, " in validated)
    metrics = client.get_run(parent.info.run_id).data.metrics
    assert {"validate_C2e09_predicted_loss", "validate_C2e09_measured_loss", "validate_C2e09_predicted_loss_lo",
            "validate_C2e09_predicted_loss_hi"} <= set(metrics)
    assert metrics["validate_C2e09_measured_loss"] > 0


def test_a_fit_made_on_another_machine_comes_from_the_store_and_a_crafted_one_is_refused(tmp_path):
    """publish_fit puts a fit and `latest` in the store; load_fit("latest") on a machine without them pulls them.
    A `latest` naming a path outside scaling/ and an oversized fit file are refused, naming the file."""
    from pipeline.cluster.storage import Mirror, ObjectStore
    from pipeline.scaling import fit_files
    from pipeline.scaling.fit_files import publish_fit

    (tmp_path / "bucket").mkdir()
    uri = f"file://{tmp_path / 'bucket'}"
    here = synthetic_fit_dir(tmp_path / "a", dict(E=1.5, A=300.0, B=600.0, alpha=0.35, beta=0.3), [1e10, 3e10, 1e11])
    publish_fit(here, Mirror(uri, scaling_root=here.parent))
    assert (here.parent / "latest").read_text() == here.name
    elsewhere = tmp_path / "b"
    fit, path = load_fit("latest", elsewhere, Mirror(uri, scaling_root=elsewhere / "scaling"))
    assert path == elsewhere / "scaling" / here.name / "scaling_fit.json" and fit.bootstrap_params
    assert path.read_bytes() == (here / "scaling_fit.json").read_bytes()

    store = ObjectStore(uri)
    store.write_text("scaling/latest", "../../../etc")
    with pytest.raises(ValueError, match=r"latest names '\.\./\.\./\.\./etc', not a fit directory"):
        load_fit("latest", tmp_path / "c", Mirror(uri, scaling_root=tmp_path / "c" / "scaling"))
    store.write_text("scaling/latest", here.name)
    big = tmp_path / "d" / "scaling" / here.name / "scaling_fit.json"
    big.parent.mkdir(parents=True)
    big.write_bytes(b" " * (fit_files.MAX_FIT_BYTES + 1))
    with pytest.raises(ValueError, match="over the"):
        load_fit(str(big), tmp_path / "d")
