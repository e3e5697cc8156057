"""Training on a mixture through the real CLI: the sources are prepared once, the loader samples them by weight
(the shares it logs match the weights), and a new weight trains again without tokenizing anything."""

from __future__ import annotations

import subprocess
import sys

import pytest
from corpora import make_corpus

TINY = [
    "data=mixture", "model.context_length=64", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
    "model.d_ff=64", "data.tokenizer.vocab_size=512", "train.max_steps=60", "train.warmup_steps=5",
    "train.lr=1e-2", "train.micro_batch_size=16", "train.global_batch_tokens=2048", "train.log_interval_steps=20",
    "eval.max_tokens=4000", "eval.num_samples=1", "eval.max_new_tokens=5", "parallel.num_workers=1",
    "parallel.precision=fp32",
]


def shares(client, run_id: str) -> dict[str, float]:
    metrics = client.get_run(run_id).data.metrics
    return {k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith("data_share.")}


@pytest.mark.distributed
def test_training_samples_a_mixture_by_weight_and_a_new_weight_tokenizes_nothing(tmp_path):
    from mlflow.tracking import MlflowClient

    from data_prep.blend import component_dirs

    notes = make_corpus(tmp_path / "notes", n_docs=40, lines=20, seed=5)
    out = tmp_path / "out"
    common = [*TINY, f"output_dir={out}", f"data.mixture.1.path={notes}"]
    first = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", *common, "run_name=first"],
                           capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-6000:]
    (blend_dir,) = [p for p in (out / "data").iterdir() if (p / "blend.json").is_file()]
    components = component_dirs(blend_dir)
    assert [p.name.split("-")[0] for p in components] == ["mixture.plays", "mixture.notes"]
    before = {p: p.stat().st_mtime_ns for d in components for p in d.iterdir()}

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])}
    # Prepare logged its progress and totals per source to its own MLflow run, in an experiment of its own.
    (prepare_run,) = client.search_runs([client.get_experiment_by_name("pipeline-prepare").experiment_id])
    assert prepare_run.info.run_name == f"prepare-{blend_dir.name}"
    assert prepare_run.data.tags["stage"] == "prepare" and prepare_run.info.status == "FINISHED"
    for source in ("plays", "notes"):
        assert prepare_run.data.metrics[f"{source}.tokens"] > 0 and f"{source}.eta_s" in prepare_run.data.metrics
    samples = 60 * 32
    tolerance = 4 * (0.21 / samples) ** 0.5  # four standard errors of a share near 0.3 / 0.7
    assert shares(client, runs["first"].info.run_id) == {"plays": pytest.approx(0.7, abs=tolerance),
                                                          "notes": pytest.approx(0.3, abs=tolerance)}
    metrics = runs["first"].data.metrics
    assert metrics["data_epochs.notes"] > metrics["data_epochs.plays"]  # the small source repeats more often
    assert {"val_loss.plays", "val_loss.notes", "val_loss"} <= set(metrics)
    history = [m.value for m in client.get_metric_history(runs["first"].info.run_id, "train_loss")]
    assert history[-1] < history[0]

    # Swap the weights: a new blend recipe over the same data sets, no tokenizer trained, nothing tokenized.
    second = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", *common, "run_name=second", "data.mixture.0.weight=0.3",
         "data.mixture.1.weight=0.7"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-6000:]
    assert "tokenizing" not in second.stderr and "trained a" not in second.stderr
    assert second.stderr.count("is already prepared") == 2
    assert {p: p.stat().st_mtime_ns for d in components for p in d.iterdir()} == before
    blends = [p for p in (out / "data").iterdir() if (p / "blend.json").is_file()]
    assert len(blends) == 2 and all(component_dirs(b) == components for b in blends)
    (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id],
                                filter_string="attributes.run_name = 'second'")
    assert shares(client, run.info.run_id) == {"plays": pytest.approx(0.3, abs=tolerance),
                                               "notes": pytest.approx(0.7, abs=tolerance)}
