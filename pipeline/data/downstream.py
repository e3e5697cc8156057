"""lm-eval-harness tasks: the shipped offline ones (lm_eval_tasks/), and their requests scored by the model being
trained, on the training workers with the training layout (train.downstream_interval_steps).

`WorkerLM` is an lm-eval `LM` whose process index is the data-parallel replica's: lm-eval gives each replica its
share of the examples and gathers the per-example metrics to replica 0. Every rank of a replica (tensor or sequence
parallel) scores the same requests; under ZeRO-3 a forward is collective, so every rank runs as many forward passes
as the rank with the most (the others run a one-window placeholder). A request is tokenized as lm-eval's own
Hugging Face model does it (trailing spaces of the context move to the continuation; the context starts as every
training document did: the tokenizer's prefix, or EOS when there is no context), left-truncated to the model's
context, and scored in fp32 from the model's logits. Only log-likelihood tasks run here (multiple_choice,
loglikelihood, loglikelihood_rolling); generation tasks run at `pipeline evaluate` on the export.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.config import ConfigError

log = logging.getLogger(__name__)

LOCAL_TASKS = Path(__file__).parent / "lm_eval_tasks"
# The task kinds a model's log-likelihoods score (WorkerLM); generate_until needs sampling, at `pipeline evaluate`.
SCORED_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling")


def task_manager(work_dir: Path, tasks: list[str]):
    """lm-eval's task registry with the shipped offline tasks (copies whose data file is an absolute path), offline,
    and lm-eval's own only where `tasks` names one of them (indexing those takes 10 s here); a ConfigError when lm-eval
    is not installed or a task is unknown."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ConfigError("eval.tasks needs lm-eval-harness: pip install lm-eval (or leave eval.tasks empty)") from err
    out = Path(work_dir) / "lm_eval_tasks"
    out.mkdir(parents=True, exist_ok=True)
    for yaml_file in LOCAL_TASKS.glob("*.yaml"):
        data_file = LOCAL_TASKS / f"{yaml_file.stem}.jsonl"
        (out / yaml_file.name).write_text(yaml_file.read_text().replace(f"test: {data_file.name}", f"test: {data_file}"))
    shipped = {p.stem for p in LOCAL_TASKS.glob("*.yaml")}
    manager = TaskManager(include_path=str(out), include_defaults=not set(tasks) <= shipped)
    _check_tasks(manager, tasks)
    return manager


def _check_tasks(manager, tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"eval.tasks names unknown lm-eval task(s) {unknown}; shipped offline tasks: "
                          f"{sorted(p.stem for p in LOCAL_TASKS.glob('*.yaml'))}")


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of lm-eval's results, standard errors and the example count left out."""
    return {task: {k.split(",")[0]: float(v) for k, v in values.items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and "stderr" not in k
                   and k != "sample_len"}
            for task, values in results["results"].items()}


def _lm_base():
    try:
        from lm_eval.api.model import LM
    except ImportError as err:
        raise ConfigError("train.downstream_interval_steps needs lm-eval-harness: pip install lm-eval") from err
    return LM


def worker_lm(module, tokenizer, context_length: int, micro_batch: int, device: torch.device, dp_size: int,
              dp_rank: int, replica: int):
    """An lm-eval LM over the training engine (see the module docstring)."""

    class WorkerLM(_lm_base()):
        def __init__(self):
            super().__init__()
            self._rank, self._world_size, self._device = dp_rank, dp_size, device

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            rows = [_pair_row(tokenizer, *req.args, context_length) for req in requests]
            return [(float(logp), bool(greedy)) for logp, greedy in self.score(rows)]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            start = tokenizer.specials.prefix[0] if tokenizer.specials.prefix else tokenizer.specials.eos_id
            rows, owner = [], []
            for i, req in enumerate(requests):
                for window in get_rolling_token_windows(tokenizer.encode(req.args[0]), start, context_length, 1):
                    context, continuation = make_disjoint_window(window)
                    rows.append(_row(context, continuation, context_length))
                    owner.append(i)
            totals = np.zeros(len(requests))
            for i, (logp, _) in zip(owner, self.score(rows), strict=True):
                totals[i] += logp
            return totals.tolist()

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise ConfigError("train.downstream_interval_steps scores log-likelihood tasks only; a generation task "
                              "runs at `pipeline evaluate eval.tasks=[...]`")

        def score(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            return score_rows(module, rows, micro_batch, device)

        def all_gather(self, tensor):
            parts = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, tensor)
            return torch.stack(parts[::replica])  # one per replica

        def gather_object(self, obj, dst=0):
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, obj)
            return parts[::replica] if self._rank == dst else None

        def barrier(self) -> None:
            dist.barrier()

    return WorkerLM()


def _pair_row(tokenizer, context: str, continuation: str, context_length: int) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's Hugging Face model encodes them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    prefix = list(tokenizer.specials.prefix)
    if not context:
        return _row(prefix or [tokenizer.specials.eos_id], tokenizer.encode(continuation), context_length)
    context_ids = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    return _row(prefix + context_ids, whole[len(context_ids):], context_length)


def _row(context: list[int], continuation: list[int], context_length: int) -> tuple[list[int], list[int]]:
    """(model input, targets): the last context_length + 1 tokens of context + continuation shifted by one, the
    targets -100 but at the continuation's positions."""
    tokens = (list(context) + list(continuation))[-(context_length + 1):]
    scored = min(len(continuation), len(tokens) - 1)
    return tokens[:-1], [-100] * (len(tokens) - 1 - scored) + tokens[len(tokens) - scored:]


@torch.no_grad()
def score_rows(module, rows: list[tuple[list[int], list[int]]], micro_batch: int,
               device: torch.device) -> list[tuple[float, bool]]:
    """(sum of the targets' log-probabilities, whether each target is the argmax) of every row, in batches of
    micro_batch; every rank runs as many forward passes as the busiest (ZeRO-3's are collective)."""
    model = getattr(module, "module", module)  # the GPT inside a DeepSpeed engine
    shard = model.sequence_shard
    multiple = shard.size if shard is not None else 1
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths together: less padding
    batches = [order[i: i + micro_batch] for i in range(0, len(order), micro_batch)]
    passes = torch.tensor([len(batches)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(passes, op=dist.ReduceOp.MAX)
    out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    was_training = module.training
    module.eval()
    try:
        for k in range(int(passes)):
            batch = batches[k] if k < len(batches) else []
            length = max([len(rows[i][0]) for i in batch] or [1])
            length = multiple * math.ceil(length / multiple)
            inputs = torch.zeros((max(1, len(batch)), length), dtype=torch.long)
            targets = torch.full_like(inputs, -100)
            for j, i in enumerate(batch):
                ids, tgt = rows[i]
                inputs[j, : len(ids)] = torch.tensor(ids)
                targets[j, : len(tgt)] = torch.tensor(tgt)
            logits, _ = module(inputs.to(device))
            targets = model.local_targets(targets).to(device)
            logp = F.log_softmax(logits.float(), dim=-1)
            kept = targets != -100
            picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            sums = torch.stack([(picked * kept).sum(1), ((logp.argmax(-1) != targets) & kept).sum(1).double()], 1)
            if shard is not None:
                sums = shard.total(sums.double())
            for j, i in enumerate(batch):
                out[i] = (float(sums[j, 0]), bool(sums[j, 1] == 0))
    finally:
        module.train(was_training)
    return out


def downstream_scores(lm, manager, tasks: list[str], limit: int | None) -> dict[str, dict[str, float]] | None:
    """{task: {metric: value}} of the tasks scored by lm (on replica 0; None on the other replicas)."""
    import lm_eval

    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.WARNING)
    bars = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # lm-eval's progress bars, on every rank, between the training log's lines
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                          bootstrap_iters=0, log_samples=False, verbosity="WARNING")
    finally:
        if bars is None:
            os.environ.pop("TQDM_DISABLE")
        else:
            os.environ["TQDM_DISABLE"] = bars
    return task_metrics(results) if results is not None else None


def refuse_generation_tasks(manager, tasks: list[str]) -> None:
    """A ConfigError naming the tasks that generate text (they cannot be scored from log-likelihoods)."""
    from lm_eval.tasks import get_task_dict

    generating = []
    for name, task in get_task_dict(list(tasks), manager).items():
        if getattr(task, "OUTPUT_TYPE", None) not in SCORED_TYPES:
            generating.append(name)
    if generating:
        raise ConfigError(f"train.downstream_interval_steps scores log-likelihood tasks only; {generating} generate "
                          f"text: score them at `pipeline evaluate eval.tasks=[...]`, or leave them out of eval.tasks")
