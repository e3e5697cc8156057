"""The loop's contract with its callbacks: every callback sees an error and is closed, the batches' reader is
closed and rank 0's metrics flushed whatever happens; metrics and tags go to MLflow from rank 0 only; the outcome
is the loop's record, not read out of callbacks.

A real gloo process group of one rank, a real GPT and a real MLflow run (SQLite) behind the pipeline's Tracker; the
engine is the GPT behind the few methods the loop calls (a DeepSpeed engine is tested end to end elsewhere).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pipeline import tracking
from pipeline.config import ModelConfig
from pipeline.model.gpt import GPT
from pipeline.train.loop import Callback, LoopState, StepResult, run_loop


class Engine:
    """The surface of a DeepSpeed engine that the loop uses, over a real GPT and SGD."""

    def __init__(self):
        torch.manual_seed(0)
        self.module = GPT(ModelConfig(vocab_size=64, context_length=8, n_layer=1, d_model=16, n_head=2, d_ff=32))
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.1)

    def train(self):
        self.module.train()

    def __call__(self, inputs, targets):
        return self.module(inputs, targets)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad()

    def get_global_grad_norm(self):
        return None

    def was_step_applied(self):
        return True

    def fp16_enabled(self):
        return False

    def get_lr(self):
        return [0.1]


class Batches:
    grad_accum = 1

    def __init__(self):
        self.closed = False

    def micro_batch_at(self, step, micro_step, device):
        tokens = torch.arange(9).add(step).remainder(64).unsqueeze(0)
        return tokens[:, :-1], tokens[:, 1:]

    def close(self):
        self.closed = True


class Tracker(tracking.Tracker):
    """The pipeline's tracker on a real MLflow run, counting its flushes."""

    flushed = 0

    def flush(self):
        self.flushed += 1
        return super().flush()


def new_tracker(tmp_path) -> Tracker:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.mlflow_client(uri)
    run = client.create_run(client.create_experiment("loop"))
    return Tracker(uri, run.info.run_id)


def sent(tracker: Tracker) -> tuple[list[int], dict[str, str]]:
    client = tracking.mlflow_client(tracker.uri)
    steps = [m.step for m in client.get_metric_history(tracker.run_id, "seen")]
    tags = {k: v for k, v in client.get_run(tracker.run_id).data.tags.items() if not k.startswith("mlflow.")}
    return steps, tags


class Recorder(Callback):
    """Reports a metric and a tag each step, keeps the loss in the record, and fails at step `fail_at`."""

    def __init__(self, *, fail_at: int | None = None):
        self.fail_at, self.errors, self.closed, self.ended = fail_at, [], 0, 0

    def after_step(self, state: LoopState, result: StepResult) -> None:
        if result.done == self.fail_at:
            raise RuntimeError(f"a bug at step {result.done}")
        state.record.losses[result.index] = result.loss
        state.record_metric("seen", float(result.done), step=result.done)
        state.record_tags({"last": str(result.done)})

    def at_end(self, state: LoopState) -> None:
        self.ended += 1

    def on_error(self, state: LoopState, error: BaseException) -> None:
        self.errors.append(error)

    def close(self, state: LoopState) -> None:
        self.closed += 1


@pytest.fixture(scope="module", autouse=True)
def one_rank(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("rank", [0, 1])
def test_metrics_and_tags_leave_from_rank_0_and_the_record_is_the_outcome(rank, tmp_path):
    tracker, batches, recorder = new_tracker(tmp_path), Batches(), Recorder()
    state = LoopState(Engine(), 0, 3, rank=rank, tracker=tracker)
    run_loop(state, [recorder], batches, torch.device("cpu"), zero_stage=0, tensor_parallel=1)
    assert sorted(state.record.losses) == [0, 1, 2] and all(v > 0 for v in state.record.losses.values())
    assert (recorder.ended, recorder.closed, recorder.errors) == (1, 1, [])
    assert batches.closed and tracker.flushed == 1
    assert sent(tracker) == (([1, 2, 3], {"last": "3"}) if rank == 0 else ([], {}))


def test_an_error_reaches_every_callback_then_propagates_and_everything_is_closed(tmp_path):
    tracker, batches = new_tracker(tmp_path), Batches()
    failing, other = Recorder(fail_at=2), Recorder()
    state = LoopState(Engine(), 0, 5, rank=0, tracker=tracker)
    with pytest.raises(RuntimeError, match="a bug at step 2"):
        run_loop(state, [failing, other], batches, torch.device("cpu"), zero_stage=0, tensor_parallel=1)
    for callback in (failing, other):
        assert [str(e) for e in callback.errors] == ["a bug at step 2"] and callback.closed == 1
        assert callback.ended == 0
    assert batches.closed and tracker.flushed == 1
    assert sorted(state.record.losses) == [0]  # step 1 was recorded by the failing callback before its bug
    assert sent(tracker) == ([1, 1], {"last": "1"})  # both callbacks reported step 1


def test_callback_constructors_take_keywords_only():
    import inspect

    from pipeline.train import callbacks

    classes = [c for _, c in inspect.getmembers(callbacks, inspect.isclass)
               if c.__module__ == callbacks.__name__ and (issubclass(c, Callback) or c is callbacks.Checkpointer)]
    assert len(classes) >= 11
    positional = [c.__name__ for c in classes
                  if any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                         for name, p in inspect.signature(c.__init__).parameters.items() if name != "self")]
    assert positional == [], f"callbacks with positional constructor arguments: {positional}"
