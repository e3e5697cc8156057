"""What every training worker runs: build the model, wrap it in a DeepSpeed engine, resume, run the loop.

The same function runs under Ray Train (pipeline.train.ray_launch) and under a plain `torchrun`/`deepspeed`
launch (pipeline.launch): it only needs torch.distributed to be initialisable from the environment.

    train_worker: process group -> pulled from the mirror -> resume point -> engine -> batches -> checkpoint loaded
                  -> callbacks -> run_loop -> outcome
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_prep.blend import load_data_info, open_split
from data_prep.dataset_store import pull_dataset
from data_prep.text_tokenizer import data_tokenizer
from pipeline.checkpoint.layout import checkpoint_root, latest_complete, read_marker
from pipeline.checkpoint.save_load import is_node_leader, load_checkpoint, mark_node_leader
from pipeline.checkpoint.store_sync import pull_checkpoint, pull_latest_checkpoint
from pipeline.cluster.storage import Mirror
from pipeline.config import replica_size
from pipeline.data.loader import RankBatches
from pipeline.model.gpt import GPT
from pipeline.model.hf_import import load_imported_weights
from pipeline.model.sequence_parallel import sequence_shard
from pipeline.tracking import Tracker
from pipeline.train.callbacks import (
    Checkpointer,
    Downstream,
    FinalCheckpoint,
    LossHistory,
    MetricsLogger,
    NonFiniteGuard,
    PeriodicCheckpoint,
    PreemptionCheck,
    SteadyThroughput,
    StepTimes,
    SystemMetrics,
    Validation,
)
from pipeline.train.distributed import (
    device_for,
    dp_seed,
    init_distributed,
    init_partitioned,
    limit_freed_memory,
    repair_zero3_sequence_parallel_average,
    seed_everything,
    sequence_parallel_groups,
    sum_head_gradients_over_tensor_parallel,
    zero3_partition_group,
)
from pipeline.train.loop import Callback, LoopState, run_loop
from pipeline.train.optimizer import build_optimizer, build_scheduler
from pipeline.train.preemption import PreemptionFlag, actor_name
from pipeline.train.run_spec import RunLink, RunSpec, TrainOutcome
from pipeline.train.throughput import peak_tflops

log = logging.getLogger(__name__)


def resume_point(spec: RunSpec, ckpt_root: Path) -> tuple[Path | None, dict]:
    """The checkpoint this worker group starts from, and the DeepSpeed config to load it with.

    The launch's own newest checkpoint comes first (a restart after a failure, even of a launch that began from an
    explicit or universal checkpoint); then the checkpoint the driver resolved from train.resume."""
    latest = latest_complete(ckpt_root)
    if latest is not None and spec.launch_id and read_marker(latest).get("client_state", {}).get("launch_id") == spec.launch_id:
        # Saved by this launch at its own layout: a plain load, not a universal one.
        return latest, {k: v for k, v in spec.ds_config.items() if k != "checkpoint"}
    return (None if spec.resume_from is None else Path(spec.resume_from)), spec.ds_config


def pull_to_node(spec: RunSpec) -> Mirror:
    """Collective: with an object store, the first worker of each node pulls what its node lacks of the data set,
    the run's newest checkpoint and the checkpoint the driver resolved; the others wait. Returns the run's
    mirror, for the pushes of new checkpoints."""
    mirror = spec.mirror()
    if not mirror.active:
        return mirror
    if is_node_leader():
        pull_dataset(mirror, Path(spec.data_dir))
        pull_latest_checkpoint(mirror, Path(spec.run_dir))
        if spec.resume_from and mirror.covers(Path(spec.resume_from)):
            pull_checkpoint(mirror, Path(spec.resume_from))
    dist.barrier()
    return mirror


def build_model(spec: RunSpec, ds_config: dict, mpu=None, resuming: bool = False) -> GPT:
    """The GPT with identical initial weights on every rank (and the same for every layout): GPT-2's
    initialisation, or the Hugging Face checkpoint model.init_from names (pipeline.model.hf_import).

    Under ZeRO-3 it is built inside deepspeed.zero.Init: each parameter is partitioned as soon as its module
    exists (over the data-parallel group under tensor parallelism: zero3_partition_group), so no rank ever holds
    the whole model; GPT-2's initialisation then runs step by step with only that step's parameters whole
    (init_partitioned: built on each rank, drawing the same random numbers as a plain build, each rank keeping its
    partition; no communication)."""
    import deepspeed

    seed_everything(spec.train.seed)
    # A resume's checkpoint replaces the initial weights: the imported ones are not read again.
    imported = None if resuming else spec.model.init_from
    if spec.parallel.zero_stage != 3:
        model = GPT(spec.model, init_weights=imported is None)
        if imported is not None:  # every rank reads the whole checkpoint (AutoTP slices what it gets)
            load_imported_weights(model, Path(imported))
        return model
    group = zero3_partition_group(spec.parallel)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, data_parallel_group=group, mpu=mpu):
        model = GPT(spec.model, init_weights=False)
    if imported is not None:
        # The first rank of each partition group (one per tensor-parallel rank) reads one tensor at a time into the
        # gathered parameter, which DeepSpeed partitions again from it; no rank holds more than one whole tensor.
        load_imported_weights(model, Path(imported), write=dist.get_rank(group) == 0,
                              gather=lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0))
        return model
    for params, init in model.init_steps():
        init_partitioned(params, init)
    return model


def held_elements(param: torch.nn.Parameter) -> int:
    """Elements of a parameter this rank holds: its ZeRO-3 partition, or the whole (AutoTP-sliced) tensor."""
    return param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()


def build_engine(spec: RunSpec, ds_config: dict, resuming: bool = False, timeline: dict | None = None):
    """The GPT wrapped in a DeepSpeed engine. The optimizer and scheduler are callables: DeepSpeed applies
    AutoTP sharding first, then builds them over the sharded model. `timeline` gets model_built, when the
    weights are built (under ZeRO-3 partitioned)."""
    import deepspeed

    mpu = sequence_parallel_groups(spec.parallel)
    model = build_model(spec, ds_config, mpu, resuming)
    if timeline is not None:
        timeline["model_built"] = time.time()
    if spec.parallel.activation_checkpointing:
        model.set_activation_checkpointing(True)
    model.set_sequence_shard(sequence_shard(spec.parallel.sequence_parallel))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        mpu=mpu,
        # Without ZeRO in fp32 DeepSpeed checks no gradient for NaN: the optimizer does.
        optimizer=lambda _params: build_optimizer(model, spec.train, check_finite=spec.parallel.zero_stage == 0),
        lr_scheduler=lambda optimizer: build_scheduler(optimizer, spec.train),
        config=ds_config,
    )
    sum_head_gradients_over_tensor_parallel(engine.module, spec.parallel.tensor_parallel)
    repair_zero3_sequence_parallel_average(engine.optimizer, spec.parallel)
    if spec.train.compile:
        engine.compile()
    return engine


def byte_lengths_of(spec: RunSpec) -> np.ndarray:
    """UTF-8 bytes per token id of the data set's tokenizer, padded to the model's vocabulary."""
    lengths = data_tokenizer(load_data_info(Path(spec.data_dir))).byte_lengths()
    return np.pad(lengths, (0, max(0, spec.model.vocab_size - len(lengths))))


def downstream_callback(spec: RunSpec, device: torch.device, world: int, replica: int) -> Downstream | None:
    """eval.tasks scored on the workers every train.downstream_interval_steps, each replica a share."""
    if not (spec.train.downstream_interval_steps and spec.downstream_tasks):
        return None
    return Downstream(tasks=spec.downstream_tasks, limit=spec.downstream_limit,
                      interval=spec.train.downstream_interval_steps, micro_batch=spec.train.micro_batch_size,
                      tokenizer=data_tokenizer(load_data_info(Path(spec.data_dir))),
                      context_length=spec.model.context_length, device=device, dp_size=world // replica,
                      dp_rank=dist.get_rank() // replica, replica=replica)


def build_callbacks(spec: RunSpec, batches: RankBatches, checkpointer: Checkpointer, start_step: int,
                    resumed_from: str | None, device: torch.device, timeline: dict[str, float],
                    monitor: SystemMetrics | None) -> tuple[list[Callback], dict[str, str]]:
    """The concerns around the step, in the order they run after each step, and the run's tags they need."""
    world, train, replica = dist.get_world_size(), spec.train, replica_size(spec.parallel)
    peak, source = (train.peak_tflops, "configured") if train.peak_tflops else peak_tflops(spec.precision, device)
    # A constant: a tag, not a metric (mfu is measured against it).
    tags = {"mfu_peak": f"{source}, {peak:g} TFLOP/s per worker", "peak_tflops_per_worker": f"{peak:g}"}
    validation = None
    if train.eval_interval_steps:
        validation = Validation(dataset=open_split(Path(spec.data_dir), "validation"),
                                interval=train.eval_interval_steps, micro_batch=train.micro_batch_size,
                                max_tokens=spec.eval_max_tokens, byte_lengths=byte_lengths_of(spec), device=device,
                                dp_size=world // replica, dp_rank=dist.get_rank() // replica,
                                tp=spec.parallel.tensor_parallel)
    callbacks = [
        LossHistory(record=spec.record_losses),
        MetricsLogger(spec=spec, batches=batches, world=world, peak_tflops=peak, device=device),
        SteadyThroughput(start_step=start_step, tokens_per_step=batches.global_batch * spec.model.context_length),
        StepTimes(timeline=timeline),
        NonFiniteGuard(max_consecutive=train.max_skipped_steps),
        validation,
        downstream_callback(spec, device, world, replica),
        # Rank 0 alone polls the driver's request (any_rank passes it on): one call a second, not one per rank.
        PreemptionCheck(flag=PreemptionFlag(Path(spec.run_dir), actor_name(spec.run_dir, spec.launch_id)
                                            if dist.get_rank() == 0 else None),
                        checkpointer=checkpointer, device=device),
        PeriodicCheckpoint(checkpointer=checkpointer, interval=train.save_interval_steps,
                           at_steps=train.save_at_steps),
        FinalCheckpoint(checkpointer=checkpointer, resumed_from=resumed_from),
        monitor,
    ]
    return [c for c in callbacks if c is not None], tags


def node_of_rank(device: torch.device) -> tuple[int, bool]:
    """(the index of this rank's node, in the order of the nodes' first ranks; whether this rank is its node's
    first), from every rank's Ray node id (the host name outside Ray). Not Ray Train's NODE_RANK, which goes by
    IP address: two Ray nodes of one machine (the loopback test cluster) share one. A collective: every rank
    calls it."""
    import hashlib
    import socket

    import ray

    ident = ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()
    key = int.from_bytes(hashlib.sha256(ident.encode()).digest()[:7], "big")
    keys = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(keys, torch.tensor([key], dtype=torch.int64, device=device))
    ranks = [int(k.item()) for k in keys]
    return list(dict.fromkeys(ranks)).index(key), ranks.index(key) == dist.get_rank()


def start_system_metrics(spec: RunSpec, link: RunLink, tracker: Tracker | None,
                         device: torch.device) -> SystemMetrics | None:
    """System metrics (CPU, memory, disk, network, GPUs) of every node the run uses, each sampled by the node's
    first rank: rank 0's node as system/<name> through rank 0's tracker, any other node k as
    system/node<k>/<name> (MLflow's naming for a node id) through a tracker of its own (rank 0 already reaches
    the tracking server from wherever it runs, so every node does). None when off, or for the other ranks.
    Every rank calls it (it gathers the ranks' nodes)."""
    if not (spec.system_metrics_interval_s and link.run_id):
        return None
    node, first = node_of_rank(device)
    if dist.get_rank() == 0:
        return SystemMetrics(tracker=tracker, interval=spec.system_metrics_interval_s).start() if tracker else None
    if not first or node == 0:
        return None
    own = Tracker(link.tracking_uri, link.run_id, background=True,
                  spill_dir=spec.run_dir if Path(spec.run_dir).is_dir() else None, flush_timeout_s=30.0)
    return SystemMetrics(tracker=own, interval=spec.system_metrics_interval_s, prefix=f"system/node{node}/",
                         owns_tracker=True).start()


def train_worker(spec: RunSpec, link: RunLink = RunLink()) -> TrainOutcome:
    """One rank of the run (reporting to the MLflow run `link`, if any); rank 0's outcome is the run's."""
    timeline = {"worker_started": time.time()}  # the start-up phases (pipeline.train.startup)
    limit_freed_memory(spec.parallel.malloc_mmap_threshold)
    if not spec.parallel.use_gpu:
        torch.set_num_threads(spec.parallel.cpus_per_worker)
    init_distributed(spec.parallel)
    mark_node_leader()
    timeline["distributed_ready"] = time.time()
    rank, world, tp = dist.get_rank(), dist.get_world_size(), spec.parallel.tensor_parallel
    replica = replica_size(spec.parallel)  # the ranks that train the same windows
    device = device_for(spec.parallel)
    ckpt_root = checkpoint_root(Path(spec.run_dir))
    mirror = pull_to_node(spec)
    tag_dir, ds_config = resume_point(spec, ckpt_root)
    engine = build_engine(spec, ds_config, resuming=tag_dir is not None, timeline=timeline)
    # Weights are built from one seed on every rank; dropout then draws from a stream of the rank's replica (the
    # tensor-parallel ranks of one drop the same elements of their replicated activations; sequence-parallel ranks
    # hold different positions, and draw streams of their own).
    torch.manual_seed(dp_seed(spec.train.seed, rank // tp))
    batches = RankBatches(open_split(Path(spec.data_dir), "train"), seed=spec.train.seed,
                          micro_batch=spec.train.micro_batch_size, grad_accum=spec.grad_accum_steps,
                          dp_size=world // replica, dp_rank=rank // replica)
    start_step, resumed_from = 0, None
    if tag_dir is not None:
        saved = load_checkpoint(engine, tag_dir)
        start_step, resumed_from = int(saved["step"]), str(tag_dir)
        batches.resume_at(start_step, int(saved["samples_consumed"]))
        if rank == 0:
            log.info("resumed from %s at step %d (%d samples consumed)", tag_dir, start_step, saved["samples_consumed"])
    # Sends in the background: a tracking server that goes away never stalls or stops training.
    tracker = (Tracker(link.tracking_uri, link.run_id, background=True, spill_dir=spec.run_dir)
               if rank == 0 and link.run_id else None)
    checkpointer = Checkpointer(engine=engine, spec=spec, batches=batches, ckpt_root=ckpt_root, world=world,
                                mirror=mirror, device=device)
    callbacks, tags = build_callbacks(spec, batches, checkpointer, start_step, resumed_from, device, timeline,
                                      start_system_metrics(spec, link, tracker, device))
    state = LoopState(engine, start_step, spec.train.max_steps, rank=rank, tracker=tracker)
    state.record_tags(tags)
    timeline["engine_ready"] = time.time()
    run_loop(state, callbacks, batches, device, spec.parallel.zero_stage, tp)
    return dataclasses.replace(outcome_of(state, engine, resumed_from), timeline=timeline | {"worker_done": time.time()})


def outcome_of(state: LoopState, engine, resumed_from: str | None) -> TrainOutcome:
    """What rank 0 hands back to the driver: the loop's record of the run."""
    record = state.record
    if state.failure:
        return TrainOutcome(state.step, record.losses, False, "", record.tokens_per_s, resumed_from,
                            grad_norms=record.grad_norms, failure=state.failure)
    if record.preempted:
        return TrainOutcome(record.final_step, record.losses, True, str(record.checkpoint), record.tokens_per_s,
                            resumed_from, grad_norms=record.grad_norms)
    return TrainOutcome(
        final_step=record.final_step,
        losses=record.losses,
        preempted=False,
        checkpoint=str(record.checkpoint),
        tokens_per_s=record.tokens_per_s,
        resumed_from=resumed_from,
        grad_norms=record.grad_norms,
        local_parameters=sum(held_elements(p) for p in engine.module.parameters()),
        val_losses=dict(record.val_losses),
        val_tokens_per_s=record.val_tokens / record.val_seconds if record.val_seconds else 0.0,
        downstream=dict(record.downstream),
        steady_tokens_per_s=record.tokens_per_s if record.steady_tokens_per_s is None else record.steady_tokens_per_s,
    )
