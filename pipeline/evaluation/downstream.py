"""Downstream evaluation with lm-eval-harness (optional dependency) on the exported Hugging Face model.

`pipeline evaluate eval.tasks=[shakespeare_next_line]` exports the checkpoint, runs the tasks offline and logs
their metrics to the run. Tasks shipped in pipeline/lm_eval_tasks/ read local data only; any other task
name is looked up in lm-eval's registry and needs its data to be reachable or cached.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pipeline.config import ConfigError

log = logging.getLogger(__name__)

LOCAL_TASKS = Path(__file__).parent / "lm_eval_tasks"


def _local_task_dir(work_dir: Path) -> Path:
    """Copies of the shipped task YAMLs with their data files as absolute paths."""
    out = work_dir / "lm_eval_tasks"
    out.mkdir(parents=True, exist_ok=True)
    for yaml_file in LOCAL_TASKS.glob("*.yaml"):
        data_file = LOCAL_TASKS / f"{yaml_file.stem}.jsonl"
        text = yaml_file.read_text().replace(f"test: {data_file.name}", f"test: {data_file}")
        (out / yaml_file.name).write_text(text)
    return out


def run_lm_eval(hf_dir: Path, tasks: list[str], work_dir: Path, limit: int | None = None,
                batch_size: int = 8) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval-harness on a transformers directory, on the first GPU in bf16 where it
    has bf16 (else fp32), or on the CPU in fp32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ConfigError("eval.tasks needs lm-eval-harness: pip install lm-eval (or leave eval.tasks empty)") from err
    import torch

    manager = TaskManager(include_path=str(_local_task_dir(work_dir)))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"eval.tasks names unknown lm-eval task(s) {unknown}; shipped offline tasks: "
                          f"{sorted(p.stem for p in LOCAL_TASKS.glob('*.yaml'))}")
    gpu = torch.cuda.is_available()
    dtype = "bfloat16" if gpu and torch.cuda.is_bf16_supported() else "float32"
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},dtype={dtype}", tasks=list(tasks), task_manager=manager,
        device="cuda:0" if gpu else "cpu", batch_size=batch_size, limit=limit,
    )
    metrics: dict[str, dict[str, float]] = {}
    for task, values in results["results"].items():
        metrics[task] = {k.split(",")[0]: float(v) for k, v in values.items()
                         if isinstance(v, int | float) and "stderr" not in k}
    (work_dir / "lm_eval_results.json").write_text(json.dumps(metrics, indent=2))
    return metrics
