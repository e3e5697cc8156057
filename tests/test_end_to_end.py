"""The whole pipeline through the real CLI: prepare (tokenizer actors on Ray) -> train (Ray Train, 2 DeepSpeed workers)
-> evaluate, with the results in a local MLflow store."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

TINY = [
    "model.context_length=64",
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.d_ff=256",
    "data.tokenizer.vocab_size=512",
    "train.max_steps=200",
    "train.warmup_steps=10",
    "train.lr=1e-2",
    "train.micro_batch_size=8",
    "train.global_batch_tokens=2048",
    "train.log_interval_steps=50",
    "train.eval_interval_steps=100",
    "eval.max_tokens=20000",
    "eval.num_samples=2",
    "eval.max_new_tokens=20",
    "parallel.num_workers=2",
    "parallel.precision=fp32",
]


def check_evaluating_every_checkpoint(tmp_path, out, client, run_id: str) -> None:
    """Every checkpoint (steps 100 and 200) evaluated after the fact, each logged at its step, with
    lm-eval-harness on each exported checkpoint, offline."""
    tasks = subprocess.run([sys.executable, "-m", "pipeline.cli", "evaluate", *TINY, f"output_dir={out}",
                            "eval.checkpoint=all", "eval.tasks=[shakespeare_next_line]", "eval.tasks_limit=8",
                            "eval.num_samples=1"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert tasks.returncode == 0, tasks.stderr[-3000:]
    acc = client.get_metric_history(run_id, "lm_eval.shakespeare_next_line.acc")
    assert [m.step for m in acc] == [100, 200] and all(0.0 <= m.value <= 1.0 for m in acc)
    val_history = client.get_metric_history(run_id, "val_loss")
    at_100 = [m.value for m in val_history if m.step == 100]  # the workers' during training, evaluate's now
    assert len(at_100) == 2 and at_100[0] == pytest.approx(at_100[1], rel=1e-5)
    samples = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert {"samples/step_00000100.txt", "samples/step_00000200.txt"} <= samples


@pytest.mark.distributed
@pytest.mark.browser
def test_pipeline_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", *TINY, f"output_dir={out}", "train.save_interval_steps=100"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout
    import re as _re

    page = _re.search(r"browse the run: http://127\.0\.0\.1:5000/#/experiments/(\S+)/runs/(\w+)"
                      r"\?workflowType=machine_learning", proc.stdout)
    assert page, proc.stdout[-2000:]  # a direct link to the run's page
    assert "--- sample 0" in proc.stdout
    from browser import check_run_page

    check_run_page(proc.stdout, "tiny-shakespeare", tmp_path)  # what a user sees at the printed link

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pipeline")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    # The model learned context: it beats a unigram model of the same tokens.
    assert metrics["val_loss"] < metrics["unigram_val_loss"] - 0.1
    # Scored on the 2 training workers at steps 100 and 200, then by pipeline evaluate (one process) at the
    # checkpoint's step 200: the same number.
    val_history = client.get_metric_history(run.info.run_id, "val_loss")
    assert sorted({m.step for m in val_history}) == [100, 200]
    at_200 = [m.value for m in val_history if m.step == 200]
    assert len(at_200) == 2 and at_200[0] == pytest.approx(at_200[1], rel=1e-5)
    assert 0 < metrics["val_bits_per_byte"] < metrics["val_loss"] / 0.6931  # nats/token over ln 2, > 1 byte/token
    for key in ("train_loss", "lr", "tokens_per_s", "mfu", "grad_norm", "memory_mb", "step_time_s",
                "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        assert key in metrics, key  # the run's own metrics and MLflow's system metrics
    assert not [k for k in metrics if k.startswith("system/node")]  # two workers, one node: rank 0's node alone
    assert run.data.params["model.n_layer"] == "2"
    assert (run.info.experiment_id, run.info.run_id) == page.groups()
    assert run.data.tags["final_step"] == "200" and "final_step" not in metrics  # constants are tags
    assert float(run.data.tags["peak_tflops_per_worker"]) > 0 and "peak_tflops_per_worker" not in metrics
    assert run.data.params["parallel.num_workers"] == "2"
    # Scored on an evaluation worker (a Ray task), not in the driver process.
    worker = _re.fullmatch(r"cpu of pid (\d+) on \S+ \(driver pid (\d+)\)", run.data.tags["evaluation_worker"])
    assert worker and worker.group(1) != worker.group(2), run.data.tags["evaluation_worker"]
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [50, 100, 150, 200]
    assert history[-1].value < history[0].value
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"tokenizer", "samples", "plots"} <= artifacts
    ckpts = out / "runs" / "tiny-shakespeare" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000200"
    assert (ckpts / "step_00000200" / "COMPLETE").is_file()

    # The checkpoint tools: inspect lists and verifies; consolidate writes weights the model loads.
    inspect = subprocess.run([sys.executable, "-m", "pipeline.cli", "checkpoint", "inspect", str(ckpts)],
                             capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0, inspect.stderr
    assert "step 200" in inspect.stdout and "ZeRO stage 1" in inspect.stdout and "sizes verified" in inspect.stdout
    out_file = tmp_path / "weights.safetensors"
    consolidate = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "checkpoint", "consolidate", str(ckpts), "--out", str(out_file)],
        capture_output=True, text=True, timeout=120,
    )
    assert consolidate.returncode == 0, consolidate.stderr
    from safetensors.torch import load_file

    gen = subprocess.run([sys.executable, "-m", "pipeline.cli", "generate", "ROMEO: it's", *TINY, f"output_dir={out}",
                          "eval.temperature=0", "eval.num_samples=1", "eval.max_new_tokens=8"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert "--- sample 0 ---\nROMEO: it's" in gen.stdout
    export = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", *TINY, f"output_dir={out}",
                             f"eval.export_dir={tmp_path / 'hf'}"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert export.returncode == 0, export.stderr[-3000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The exported model and tokenizer, loaded as a user would, continue the prompt greedily as we do.
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = hf_tok("ROMEO: it's", return_tensors="pt", add_special_tokens=False).input_ids
    hf_text = hf_tok.decode(hf_model.generate(ids, max_new_tokens=8, do_sample=False)[0])
    ours = gen.stdout.split("--- sample 0 ---\n", 1)[1]
    assert hf_text.rstrip("\n") == ours.rstrip("\n")

    from pipeline.checkpoint.consolidate import consolidated_state_dict

    weights = load_file(out_file)
    expected = consolidated_state_dict(ckpts / "step_00000200")
    assert weights.keys() == expected.keys()
    assert all(weights[k].dtype == torch.float32 and torch.equal(weights[k], expected[k]) for k in expected)
    assert weights["tok_emb.weight"].shape == (512, 64)

    check_evaluating_every_checkpoint(tmp_path, out, client, run.info.run_id)


@pytest.mark.distributed
def test_torchrun_launch_trains_on_prepared_data(tmp_path):
    """The same training function without Ray: torchrun starts the ranks, rank 0 resolves the run and logs to
    MLflow, and the run is concluded as the Ray driver concludes it (start-up phases, loss curve); a job rank 0
    cannot resolve stops every rank with its message and exit code 2."""
    import os
    from pathlib import Path

    out = tmp_path / "out"
    overrides = [*TINY, f"output_dir={out}", "train.max_steps=6", "train.warmup_steps=2", "run_name=torchrun"]
    prep = subprocess.run([sys.executable, "-m", "pipeline.cli", "prepare", *overrides],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert prep.returncode == 0, prep.stderr[-4000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node=2", "--master_port=29611", "-m", "pipeline.launch", *overrides],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert (out / "runs" / "torchrun" / "checkpoints" / "step_00000006" / "COMPLETE").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "torchrun"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [6]
    assert "plots" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert any(k.startswith("startup/") for k in run.data.tags), run.data.tags

    # Resuming the finished run with another learning rate: refused on rank 0 while it resolves the run, and
    # every rank stops with the message instead of waiting for rank 0.
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node=2", "--master_port=29611", "-m", "pipeline.launch", *overrides,
         "train.lr=5e-3"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0, proc.stderr[-6000:]
    assert "error: rank 0 could not start the run: the checkpoint" in proc.stderr, proc.stderr[-6000:]
    assert proc.stderr.count("was trained with a different config") >= 2
