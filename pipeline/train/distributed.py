"""The few collective helpers a worker needs beside DeepSpeed: process group, device, seeding, a mean over ranks
and the gradient norm where DeepSpeed reports none."""

from __future__ import annotations

import random
import warnings

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import ParallelConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def limit_freed_memory(threshold: int) -> bool:
    """glibc's mmap threshold for this process (parallel.malloc_mmap_threshold; 0 leaves glibc's dynamic one), as
    MALLOC_MMAP_THRESHOLD_ would set it at start-up: large host blocks are mapped and returned when freed instead
    of staying in the heap for reuse. Whether it was set (not on a C library without mallopt)."""
    if threshold <= 0:
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False


def init_distributed(parallel: ParallelConfig) -> None:
    import deepspeed

    # DeepSpeed 0.19.8 calls the collectives torch 2.13 renamed (every rank printed the deprecation, twice).
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")

    if not parallel.use_gpu:
        skip_shared_memory_op()
    backend = "nccl" if parallel.use_gpu else "gloo"
    deepspeed.init_distributed(dist_backend=backend)


def zero3_partition_group(parallel: ParallelConfig):
    """The process group ZeRO-3 partitions the weights over as zero.Init builds them: all ranks (None) without
    tensor parallelism, else the data-parallel group of DeepSpeed's AutoTP mesh, made here (the engine finds it
    made). Over all ranks, the weights AutoTP leaves whole (embeddings, norms) would stay partitioned over the
    tensor-parallel ranks too while the ones it slices are partitioned over the data-parallel group: training
    is right either way, but the checkpoint mixes two layouts that neither zero_to_fp32 nor ds_to_universal
    reads (measured with DeepSpeed 0.19.8). A collective: every rank calls it."""
    if parallel.tensor_parallel == 1:
        return None
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=parallel.tensor_parallel)
    return groups.get_data_parallel_group()


def init_partitioned(params: list[torch.nn.Parameter], init) -> None:
    """Run `init` (which writes `params` whole) on ZeRO-3 partitioned parameters without communication: each
    rank builds the whole tensors for the moment (fp32, on the CPU: the numbers a plain build draws, whatever the
    device or the precision the partitions are kept in), runs init and keeps its own partition, cast into it,
    laid out as DeepSpeed partitions a parameter (its rank in the parameter's group times the partition size, the
    tail of the last partition padding). What deepspeed.zero.GatheredParameters(params, modifier_rank=0) gives,
    without gathering every parameter and broadcasting it back (two passes of the whole model over the network at
    start-up). Parameters whose partitions live elsewhere (NVMe offload) or have a secondary copy (ZeRO++) go
    through GatheredParameters, which swaps and re-partitions them."""
    import deepspeed
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    if any(getattr(p.ds_tensor, "final_location", None) == OffloadDeviceEnum.nvme
           or getattr(p, "ds_secondary_tensor", None) is not None
           for p in params):
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            init()
        return
    placeholders = [p.data for p in params]
    for p in params:
        p.data = torch.empty(p.ds_shape, dtype=torch.float32, device="cpu")
    try:
        with torch.no_grad():
            init()
            for p in params:
                size = p.ds_tensor.ds_numel
                start = size * dist.get_rank(group=p.ds_process_group)
                count = max(0, min(size, p.ds_numel - start))
                if count:
                    p.ds_tensor.narrow(0, 0, count).copy_(p.data.view(-1).narrow(0, start, count))
    finally:
        for p, placeholder in zip(params, placeholders, strict=True):
            p.data = placeholder


def sequence_parallel_groups(parallel: ParallelConfig):
    """DeepSpeed's sequence-parallel groups (the `mpu` that deepspeed.initialize and zero.Init take), made here:
    groups of `sequence_parallel` consecutive ranks, and ZeRO's partitions and gradient reductions over all ranks
    (the sequence-data-parallel group); None without sequence parallelism. A collective: every rank calls it,
    once per process."""
    if parallel.sequence_parallel == 1:
        return None
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    parallel_state_sp.initialize_sequence_parallel(parallel.sequence_parallel)
    return parallel_state_sp


def repair_zero3_sequence_parallel_average(optimizer, parallel: ParallelConfig) -> bool:
    """Under sequence parallelism gradients are summed over the sequence-parallel group and averaged over the
    data-parallel ranks: DeepSpeed's reductions divide by world / sequence_parallel (ZeRO 0-2 and ZeRO-3's
    contiguous all-reduce), but ZeRO-3's reduce-scatter path (its default, `reduce_scatter: true`, and any bucket
    larger than reduce_bucket_size) divides by the whole world (DeepSpeed 0.19.8, stage3.py __avg_scatter_grads):
    every update of a ZeRO-3 sp 2 run was half as large (measured: its gradient norm exactly half the one-rank
    run's). Repaired here by scaling that path's partitions by the sequence-parallel degree; returns whether it
    applied."""
    sp = parallel.sequence_parallel
    if sp == 1 or parallel.zero_stage != 3:
        return False
    name = "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads"
    averaged = getattr(optimizer, name, None)
    if averaged is None:
        raise RuntimeError(
            f"parallel.sequence_parallel={sp} with ZeRO-3: this DeepSpeed's ZeRO-3 optimizer has no {name}, whose "
            f"average the pipeline repairs (DeepSpeed 0.19.8 divides it by the whole world); check that this "
            f"version's reduce-scatter averages over world / sequence_parallel and update "
            f"pipeline.train.distributed.repair_zero3_sequence_parallel_average."
        )

    def summed_over_the_sequence_group(params, communication_data_type):
        return [g.mul_(sp) for g in averaged(params, communication_data_type)]

    setattr(optimizer, name, summed_over_the_sequence_group)
    return True


def skip_shared_memory_op() -> None:
    """DeepSpeed's CPU backend compiles a C++ shared-memory all-reduce (g++, about 30 s on 2 cores) when the
    first process group starts, on every fresh machine and again whenever another installation used the
    torch-extensions cache; only DeepSpeed-Inference's inference_all_reduce uses it, never training. Marked
    incompatible, the backend goes without it (DeepSpeed reads this table lazily; a version without it simply
    builds the op as before)."""
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def dp_seed(seed: int, dp_rank: int) -> int:
    """The seed of a data-parallel rank's random stream (dropout): distinct per rank, the same on the tensor-
    parallel ranks of one replica (they must drop the same elements of replicated activations)."""
    return int(np.random.SeedSequence([seed, dp_rank]).generate_state(1)[0])


def device_for(parallel: ParallelConfig) -> torch.device:
    if parallel.use_gpu:
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().device_name(), get_accelerator().current_device())
    return torch.device("cpu")


def mean_over_ranks(value: float | torch.Tensor, device: torch.device) -> float:
    t = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(1).clone()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def grad_norm(module: torch.nn.Module, tp: int) -> float:
    """Global L2 norm of the (data-parallel averaged) gradients, before clipping, where DeepSpeed reports none
    (ZeRO-0). Under AutoTP a sharded weight (DeepSpeed marks it `tensor_model_parallel`) contributes the sum
    over the tensor-parallel group; a replicated one (norms, embeddings, row-parallel biases) counts once."""
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in module.parameters():
        if p.grad is None:
            continue
        square = p.grad.detach().double().pow(2).sum().cpu()
        if getattr(p, "tensor_model_parallel", False):
            sharded += square
        else:
            replicated += square
    if tp > 1:
        from deepspeed.utils import groups

        device = next(module.parameters()).device
        sharded = sharded.to(device)
        dist.all_reduce(sharded, group=groups.get_tensor_model_parallel_group())
        sharded = sharded.cpu()
    return float((sharded + replicated).sqrt())


# Replicated on every tensor-parallel rank, yet each rank's gradient covers only the heads it holds.
HEAD_SUMMED_PARAMETERS = ("attn.q_norm.weight", "attn.k_norm.weight")


def sum_head_gradients_over_tensor_parallel(module: torch.nn.Module, tp: int) -> int:
    """QK-norm's weights scale every head alike, so their full gradient is the sum over all heads; under AutoTP
    a rank holds n_head / tp heads and computes only its part. A hook sums the parts over the tensor-parallel
    group as each gradient is produced (before DeepSpeed averages over data-parallel ranks), so every rank
    applies the same update as one rank would. Returns the number of parameters hooked."""
    if tp <= 1:
        return 0
    from deepspeed.utils import groups

    group = groups.get_tensor_model_parallel_group()

    def summed(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    hooked = 0
    for name, param in module.named_parameters():
        if name.endswith(HEAD_SUMMED_PARAMETERS):
            param.register_hook(summed)
            hooked += 1
    return hooked
