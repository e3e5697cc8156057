"""Downstream scores during training (train.downstream_interval_steps; pipeline.data.downstream): the shipped
lm-eval task scored on the training workers with the training layout equals what lm-eval's own Hugging Face model
scores on the exported weights (request by request), and every layout (2 data-parallel ranks under ZeRO-3, tensor
parallelism 2, sequence parallelism 2) scores the one-process numbers of the weights it trained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_helpers import run_distributed

from pipeline.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from pipeline.train.ds_config import make_ds_config

STEPS, LIMIT, TASK = 4, 10, "shakespeare_next_line"
MODEL = ModelConfig(vocab_size=400, context_length=64, n_layer=2, n_head=4, d_model=32, d_ff=64)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data_prep.shards import write_synthetic_dataset
    from data_prep.sources import shakespeare_documents
    from data_prep.tokenizer import train_tokenizer
    from pipeline.config import TokenizerConfig

    root = tmp_path_factory.mktemp("downstream")
    tokenizer = train_tokenizer(list(shakespeare_documents())[:40], TokenizerConfig(vocab_size=400), root / "t.model",
                                seed=0)
    rng = np.random.default_rng(0)
    windows = (rng.integers(0, 400, size=(80, 1)) + np.arange(65)[None, :]) % 400
    return write_synthetic_dataset(root / "data", windows, vocab_size=400, val_windows=8, tokenizer=tokenizer)


def requests(limit: int):
    """The task's log-likelihood requests, as lm-eval builds them."""
    import tempfile

    from lm_eval.tasks import get_task_dict

    from pipeline.data.downstream import task_manager

    with tempfile.TemporaryDirectory() as scratch:
        task = get_task_dict([TASK], task_manager(Path(scratch), [TASK]))[TASK]
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        return [instance for instance in task.instances]


def one_process_scores(model: torch.nn.Module, tokenizer, limit: int) -> dict[str, float]:
    import tempfile

    from pipeline.data.downstream import downstream_scores, task_manager, worker_lm

    with tempfile.TemporaryDirectory() as scratch:
        lm = worker_lm(model, tokenizer, MODEL.context_length, 4, torch.device("cpu"), 1, 0, 1)
        return downstream_scores(lm, task_manager(Path(scratch), [TASK]), [TASK], limit)[TASK]


def test_the_workers_score_each_request_as_lm_evals_hugging_face_model(data_dir, tmp_path):
    """Request by request, the log-likelihood and greediness the training model gives equal lm-eval's HFLM on the
    exported weights and tokenizer (fp32)."""
    from lm_eval.models.huggingface import HFLM

    from data_prep.shards import load_manifest
    from data_prep.text_tokenizer import data_tokenizer
    from pipeline.data.downstream import worker_lm
    from pipeline.evaluation.export import export_tokenizer, hf_weights, write_weights
    from pipeline.model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(MODEL).eval()
    model_class, hf_cfg, weights = hf_weights(MODEL, model.state_dict())
    hf_cfg.architectures = [model_class.__name__]
    hf_cfg.save_pretrained(tmp_path / "hf")
    write_weights(tmp_path / "hf", weights, torch.float32, 1 << 30, {"lm_head.weight"})
    manifest = load_manifest(data_dir)
    export_tokenizer(manifest, tmp_path / "hf")
    reqs = requests(LIMIT)
    assert len(reqs) == 4 * LIMIT
    ours = worker_lm(model, data_tokenizer(manifest), MODEL.context_length, 3, torch.device("cpu"), 1, 0,
                     1).loglikelihood(reqs)
    theirs = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=4, dtype="float32").loglikelihood(reqs)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert np.allclose([x for x, _ in ours], [x for x, _ in theirs], atol=1e-4)


def make_spec(data_dir, run_dir, *, workers=1, tp=1, sp=1, zero=0):
    from pipeline.train.run_spec import RunSpec

    train = TrainConfig(max_steps=STEPS, micro_batch_size=2, warmup_steps=1, lr=1e-2, resume="none",
                        global_batch_tokens=4 * 64, log_interval_steps=1, peak_tflops=1.0,
                        downstream_interval_steps=2)
    parallel = ParallelConfig(num_workers=workers, tensor_parallel=tp, sequence_parallel=sp, zero_stage=zero,
                              precision="fp32")
    accum = 4 // (2 * (workers // (tp * sp)))
    return RunSpec(
        model=MODEL, train=train, parallel=parallel, data_dir=str(data_dir), run_dir=str(run_dir), precision="fp32",
        grad_accum_steps=accum, ds_config=make_ds_config(train, parallel, "fp32", accum, d_model=MODEL.d_model),
        flops_per_token=1.0, config_fingerprint="test", math_config={}, tokenizer_sha256="",
        downstream_tasks=[TASK], downstream_limit=LIMIT,
    )


def train_and_report(spec):
    from pipeline.train.worker import train_worker

    return train_worker(spec)


scores: dict[str, dict[int, dict[str, float]]] = {}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [dict(workers=2, zero=3), dict(workers=2, tp=2), dict(workers=2, sp=2)],
                         ids=["dp2-zero3", "tp2", "sp2"])
def test_downstream_scores_on_the_workers_equal_one_process_scores(data_dir, tmp_path, layout):
    from data_prep.shards import load_manifest
    from data_prep.text_tokenizer import data_tokenizer
    from pipeline.checkpoint.layout import checkpoint_root, latest_complete
    from pipeline.evaluation.evaluate import load_trained_model

    spec = make_spec(data_dir, tmp_path, **layout)
    outcome = run_distributed(train_and_report, spec.parallel.num_workers, spec)[0]
    assert sorted(outcome.downstream) == [2, STEPS]  # the interval and the last step
    final = outcome.downstream[STEPS]
    assert set(final) >= {f"lm_eval.{TASK}.acc", f"lm_eval.{TASK}.acc_norm"}
    trained = load_trained_model(MODEL, latest_complete(checkpoint_root(Path(spec.run_dir))))
    reference = one_process_scores(trained, data_tokenizer(load_manifest(data_dir)), LIMIT)
    assert {k.removeprefix(f"lm_eval.{TASK}."): v for k, v in final.items()} == pytest.approx(reference)
    scores["-".join(f"{k}{v}" for k, v in layout.items())] = outcome.downstream
    first = next(iter(scores.values()))  # every layout trains the same model (training equivalence)
    for step in (2, STEPS):
        assert outcome.downstream[step] == pytest.approx(first[step])


def test_downstream_scores_need_tasks_and_refuse_generation_tasks(tmp_path):
    import tempfile

    from pipeline.compose import compose_config
    from pipeline.data.downstream import refuse_generation_tasks, task_manager

    with pytest.raises(ConfigError, match=r"train.downstream_interval_steps=5 but eval.tasks is empty"):
        compose_config(["train.downstream_interval_steps=5"], stage="train")
    task = tmp_path / "writes.yaml"
    task.write_text("task: writes\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
                    f"{tmp_path / 'w.jsonl'}\ntest_split: test\noutput_type: generate_until\ndoc_to_text: '{{{{q}}}}'\n"
                    "doc_to_target: '{{a}}'\nmetric_list:\n  - metric: exact_match\n")
    (tmp_path / "w.jsonl").write_text('{"q": "a", "a": "b"}\n')
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    with pytest.raises(ConfigError, match=r"scores log-likelihood tasks only; \['writes'\] generate text"):
        refuse_generation_tasks(manager, ["writes"])
    with tempfile.TemporaryDirectory() as scratch, pytest.raises(ConfigError, match="unknown lm-eval task"):
        task_manager(Path(scratch), ["no_such_task_anywhere"])
