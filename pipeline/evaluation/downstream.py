"""Downstream evaluation with lm-eval-harness (optional dependency) on the exported Hugging Face model.

`pipeline evaluate eval.tasks=[shakespeare_next_line]` exports the checkpoint, runs the tasks offline and logs
their metrics to the run. Tasks shipped in pipeline/data/lm_eval_tasks/ read local data only; any other task
name is looked up in lm-eval's registry and needs its data to be reachable or cached. The same tasks scored during
training, on the workers: pipeline.data.downstream (train.downstream_interval_steps).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.data.downstream import task_manager, task_metrics

log = logging.getLogger(__name__)


def run_lm_eval(hf_dir: Path, tasks: list[str], work_dir: Path, limit: int | None = None,
                batch_size: int = 8) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval-harness on a transformers directory, on the first GPU in bf16 where it
    has bf16 (else fp32), or on the CPU in fp32."""
    manager = task_manager(work_dir, tasks)
    import lm_eval
    import torch

    gpu = torch.cuda.is_available()
    dtype = "bfloat16" if gpu and torch.cuda.is_bf16_supported() else "float32"
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},dtype={dtype}", tasks=list(tasks), task_manager=manager,
        device="cuda:0" if gpu else "cpu", batch_size=batch_size, limit=limit,
    )
    metrics = task_metrics(results)
    (work_dir / "lm_eval_results.json").write_text(json.dumps(metrics, indent=2))
    return metrics
