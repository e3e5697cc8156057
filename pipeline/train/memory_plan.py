"""`pipeline plan`: memory per rank and time per step of a training layout, before anything starts.

Memory per rank, in bytes, for a model of P parameters of which P_split are split by tensor parallelism (the
attention and MLP matrices and their column-parallel biases), so that a rank's model holds
P_rank = P - P_split + P_split / tp:

    parameters   p x P_rank          / dp under ZeRO-3
    gradients    g x P_rank          / dp under ZeRO-2 and 3
    optimizer    o x P_rank          / dp under ZeRO-1, 2 and 3

(p, g, o) = (2, 2, 12) for fp16: 16-bit weights and gradients, fp32 master weights and Adam's m and v
(Rajbhandari et al. 2020); (4, 4, 8) for fp32. bf16 keeps its gradients in fp32 (pipeline.train.ds_config:
accumulated and reduced in fp32): at ZeRO 0 and 1 the weights themselves are fp32 under autocast, (4, 4, 8) as
in fp32; (2, 2, 12) under ZeRO-2 and (2, 4, 12) under ZeRO-3 (the fp32 gradient partition). Beyond these model states
DeepSpeed keeps fp32 gradients (and, in fp32 under ZeRO, a copy of the weights) for its optimizer, measured on
this machine (benchmarks/zero_memory.py):

    fp32 copies  fp16: 4 x P_rank without ZeRO, 4 x P_rank / dp under ZeRO-1 and 2 (the fp32 gradient of the
                 rank's partition at the step), under ZeRO-3 4 bytes for one optimizer sub-group
                 (sub_group_size, 10 d_model^2: pipeline.train.ds_config);
                 bf16: 2 x P_rank without ZeRO (autocast's bf16 copies of the weights), fp32's copies at
                 ZeRO-1 (autocast's copies are freed during the backward pass before the gradients peak:
                 measured), 4 x P_rank / dp under ZeRO-2, a sub-group under ZeRO-3;
                 fp32: none without ZeRO (torch's AdamW updates the weights themselves), 8 x P_rank / dp under
                 ZeRO-1 and 2 (a copy of the partition and its gradient), 4 x P_rank / dp and a sub-group's
                 gradient under ZeRO-3;
                 and at dp > 1 without ZeRO, where the engine all-reduces the gradients itself, the flat
                 bucket it copies them into: min(P_rank, 5e8) elements in the communication dtype (4 bytes,
                 2 in fp16)

    activations  per layer, 16-bit: s b h (8 + 24 / tp) bytes (Korthikanti et al. 2022, without the 5 a s^2 b
                 of the attention scores, which fused attention (SDPA) never stores, and without the dropout
                 masks when dropout is 0); fp32 doubles it. With activation checkpointing only each block's
                 input is kept (2 s b h, fp32 4 s b h) plus one block's working set during its recomputation.
    logits       fp32: b s V x 12 (the logits, the log-softmax the loss keeps, their gradient); 16-bit: b s V x 4
                 (the logits and their gradient) and one fp32 chunk of the loss (LOSS_CHUNK_ELEMENTS x 12 bytes:
                 pipeline.model.gpt.cross_entropy_fp32 never upcasts the whole logits).

s is the context (context_length / sp under sequence parallelism: a rank of the group keeps the activations and
logits of its slice; ZeRO partitions over all ranks, so dp above is num_workers / tp), b the micro-batch, h
d_model, V the vocabulary. Document masking's mask is not counted: FlexAttention's block mask is small, and SDPA's
is built a block of 1024 queries at a time (pipeline.model.gpt.QUERY_BLOCK). Buffers of the framework (communication
buckets, CUDA context, allocator fragmentation) are not modelled: the verdict keeps 10% of the device free for
them. On CPU the "device" is the host: its RAM divided between the ranks of one machine (device_memory), so that
a model too large for the machine is refused before anything allocates instead of swapping or being killed. Step
time is training FLOPs / (ranks x peak x MFU) at an assumed MFU.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from pipeline.config import (
    ConfigError,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    data_parallel_size,
    mlp_width,
)
from pipeline.model.gpt import LOSS_CHUNK_ELEMENTS
from pipeline.model.size import count_parameters, training_flops_per_token
from pipeline.train.throughput import GPUS, gpu_by_name

GIB = 2**30
# Elements per bucket of DeepSpeed's engine all-reduce (deepspeed.runtime.engine.MEMORY_OPT_ALLREDUCE_SIZE).
ALLREDUCE_BUCKET = 500_000_000
# Of the device's memory, what the plan may fill: the rest is for what it does not model.
USABLE_FRACTION = 0.9



@dataclass
class MemoryPlan:
    """Bytes per rank."""

    parameters: float
    gradients: float
    optimizer: float
    fp32_copies: float  # DeepSpeed's fp32 gradients (and weight copies) beside the model states
    activations: float
    logits: float
    # train.async_checkpoint on CPU: the copy of the saved weights and optimizer states the writer keeps in the
    # same RAM (on a GPU it is host memory, not the device's: 0).
    checkpoint_copy: float = 0.0

    @property
    def model_states(self) -> float:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.fp32_copies + self.activations + self.logits + self.checkpoint_copy


def parameters_per_rank(model: ModelConfig, tensor_parallel: int) -> float:
    """P_rank: the parameters one rank's module holds before ZeRO partitions them."""
    p = count_parameters(model)
    d, d_ff = model.d_model, mlp_width(model)
    column_biases = model.n_layer * (3 * d + (p.n_mlp_matrices - 1) * d_ff) if model.bias else 0
    split = p.attention + p.mlp + column_biases
    return p.total - split + split / tensor_parallel


def activation_bytes(model: ModelConfig, micro_batch: int, tensor_parallel: int, precision: str,
                     checkpointing: bool, sequence_parallel: int = 1) -> float:
    """Activations kept for the backward pass by one rank, all layers: a sequence-parallel rank keeps those of its
    context_length / sequence_parallel positions (Ulysses' attention holds every position for 1 / sp of the heads:
    the same size)."""
    s, b, h = model.context_length // sequence_parallel, micro_batch, model.d_model
    scale = 2 if precision == "fp32" else 1
    masks = 2 * s * b * h if model.dropout > 0 else 0  # two residual dropout masks of one byte per element
    per_layer = scale * s * b * h * (8 + 24 / tensor_parallel) + masks
    if not checkpointing:
        return model.n_layer * per_layer
    return model.n_layer * scale * 2 * s * b * h + per_layer


def plan_memory(model: ModelConfig, parallel: ParallelConfig, train: TrainConfig, precision: str) -> MemoryPlan:
    """Bytes per rank of the layout (model.vocab_size must be set)."""
    tp, stage = parallel.tensor_parallel, parallel.zero_stage
    dp = parallel.num_workers // tp
    p_rank = parameters_per_rank(model, tp)
    sub_group = 4 * min(10 * model.d_model**2, p_rank / dp) / p_rank  # bytes per parameter of the rank
    weight, grad, optim, copies = state_bytes(precision, stage, dp, sub_group)
    if dp > 1 and stage == 0:
        # The engine's own all-reduce flattens the gradients into buckets of up to ALLREDUCE_BUCKET elements,
        # in the communication dtype (fp32 but for fp16).
        copies += (2 if precision == "fp16" else 4) * min(p_rank, ALLREDUCE_BUCKET) / p_rank
    b, s = train.micro_batch_size, model.context_length // parallel.sequence_parallel
    logits = b * s * model.vocab_size
    parameters = weight * p_rank / (dp if stage >= 3 else 1)
    optimizer = optim * p_rank / (dp if stage >= 1 else 1)
    return MemoryPlan(
        parameters=parameters,
        gradients=grad * p_rank / (dp if stage >= 2 else 1),
        optimizer=optimizer,
        fp32_copies=copies * p_rank,
        activations=activation_bytes(model, b, tp, precision, parallel.activation_checkpointing,
                                     parallel.sequence_parallel),
        logits=12 * logits if precision == "fp32" else 4 * logits + 12 * min(logits, LOSS_CHUNK_ELEMENTS),
        checkpoint_copy=parameters + optimizer if train.async_checkpoint and not parallel.use_gpu else 0.0,
    )


def state_bytes(precision: str, stage: int, dp: int, sub_group: float) -> tuple[float, float, float, float]:
    """Bytes per parameter of a rank's module: weights, gradients, optimizer states (before ZeRO divides them)
    and DeepSpeed's fp32 copies beside them (already divided), as in the module docstring."""
    if precision == "fp32":
        return 4, 4, 8, {0: 0, 1: 8 / dp, 2: 8 / dp, 3: 4 / dp + sub_group}[stage]
    if precision == "bf16":
        if stage == 0:  # fp32 weights under autocast, and its bf16 copies of them
            return 4, 4, 8, 2
        if stage == 1:  # as fp32 (autocast's copies are gone before the gradients peak: measured)
            return 4, 4, 8, 8 / dp
        return 2, 4 if stage == 3 else 2, 12, {2: 4 / dp, 3: sub_group}[stage]
    return 2, 2, 12, {0: 4, 1: 4 / dp, 2: 4 / dp, 3: sub_group}[stage]


def parse_memory(text: str) -> float:
    """'80GB', '80 GiB', '141G', '24576MB' -> bytes (GB is taken as GiB, as devices report it)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([GMT]i?B?)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ConfigError(f"--gpu-memory {text!r} is not a size: write it like 80GB, 141GiB or 24576MB.")
    unit = (match.group(2) or "G")[0].upper()
    return float(match.group(1)) * {"M": 2**20, "G": 2**30, "T": 2**40}[unit]


def gpu_spec(name: str) -> tuple[float, float]:
    """(memory in bytes, dense 16-bit peak in TFLOP/s) of a named GPU."""
    found = gpu_by_name(name)
    if found is not None:
        return found[1].memory_gib * GIB, found[1].bf16_tflops
    raise ConfigError(f"--gpu {name} is not a GPU this planner knows: use one of {', '.join(GPUS)}, or give "
                      f"--gpu-memory and --peak-tflops.")


@dataclass
class Layout:
    zero_stage: int
    tensor_parallel: int
    activation_checkpointing: bool

    def describe(self) -> str:
        recompute = ", activation checkpointing" if self.activation_checkpointing else ""
        return f"ZeRO-{self.zero_stage}, tp={self.tensor_parallel}{recompute}"


def layouts_that_fit(model: ModelConfig, parallel: ParallelConfig, train: TrainConfig, precision: str,
                     device_bytes: float) -> list[Layout]:
    """Other layouts of the same number of ranks (ZeRO stage, tensor-parallel degree up to 8, activation
    checkpointing) that fit, fewest changes first."""
    fits = []
    for recompute in (parallel.activation_checkpointing, True):
        tps = (1,) if parallel.sequence_parallel > 1 else (1, 2, 4, 8)  # not both (validate_sequence_parallel)
        for tp in (t for t in tps if model.n_head % t == 0 and parallel.num_workers % t == 0):
            for stage in (0, 1, 2, 3):
                layout = Layout(stage, tp, recompute)
                trial = dataclasses.replace(parallel, zero_stage=stage, tensor_parallel=tp,
                                            activation_checkpointing=recompute)
                if plan_memory(model, trial, train, precision).total <= USABLE_FRACTION * device_bytes:
                    fits.append(layout)
    current = Layout(parallel.zero_stage, parallel.tensor_parallel, parallel.activation_checkpointing)
    unique = [x for i, x in enumerate(fits) if x not in fits[:i] and x != current]

    def changes(x: Layout) -> tuple:
        return (x.activation_checkpointing != current.activation_checkpointing, x.tensor_parallel != current.tensor_parallel,
                x.tensor_parallel, x.zero_stage)

    return sorted(unique, key=changes)


def largest_micro_batch(model: ModelConfig, parallel: ParallelConfig, train: TrainConfig, precision: str,
                        device_bytes: float) -> int | None:
    """The largest micro-batch below the configured one at which this layout fits (the global batch stays: more
    accumulation steps), or None when not even 1 does."""
    for micro in range(train.micro_batch_size - 1, 0, -1):
        trial = dataclasses.replace(train, micro_batch_size=micro)
        if plan_memory(model, parallel, trial, precision).total <= USABLE_FRACTION * device_bytes:
            return micro
    return None


def step_seconds(model: ModelConfig, parallel: ParallelConfig, train: TrainConfig, peak_tflops: float,
                 mfu: float) -> float:
    """Seconds per optimizer step at the given MFU of every rank's peak."""
    flops = training_flops_per_token(model) * train.global_batch_tokens
    return flops / (parallel.num_workers * peak_tflops * 1e12 * mfu)


def _gib(nbytes: float) -> str:
    gib = nbytes / GIB
    return f"{gib:.0f} GiB" if abs(gib - round(gib)) < 0.05 else f"{gib:.1f} GiB"


def report(model: ModelConfig, parallel: ParallelConfig, train: TrainConfig, precision: str,
           device_bytes: float | None, peak_tflops: float | None, mfu: float, tokens: float,
           memory_source: str = "") -> tuple[str, bool]:
    """The plan as text, and whether the layout fits the device (True when no device memory is given);
    memory_source says where device_bytes comes from (e.g. "host RAM 23.4 GiB / 2 ranks")."""
    plan = plan_memory(model, parallel, train, precision)
    dp = data_parallel_size(parallel)
    split = f"sp {parallel.sequence_parallel}" if parallel.sequence_parallel > 1 else f"tp {parallel.tensor_parallel}"
    lines = [
        f"model {model.name}: {count_parameters(model).total:,} parameters; {parallel.num_workers} ranks = dp {dp} x "
        f"{split}; ZeRO-{parallel.zero_stage}; {precision}; micro-batch "
        f"{train.micro_batch_size} x context {model.context_length}"
        + ("; activation checkpointing" if parallel.activation_checkpointing else ""),
        "",
        "memory per rank:",
    ]
    rows = [("parameters", plan.parameters), ("gradients", plan.gradients), ("optimizer states", plan.optimizer),
            ("DeepSpeed fp32 copies", plan.fp32_copies), ("activations", plan.activations),
            ("logits and loss", plan.logits),
            *([("async checkpoint copy", plan.checkpoint_copy)] if plan.checkpoint_copy else []),
            ("total", plan.total)]
    lines += [f"  {name:<22} {value / GIB:10.2f} GiB" for name, value in rows]
    fits = True
    if device_bytes is not None:
        usable = USABLE_FRACTION * device_bytes
        fits = plan.total <= usable
        of = f"({USABLE_FRACTION:.0%} of {_gib(device_bytes)}{': ' + memory_source if memory_source else ''})"
        lines.append("")
        if fits:
            lines.append(f"verdict: fits: {plan.total / GIB:.1f} GiB per rank <= {usable / GIB:.1f} GiB {of}")
        else:
            others = layouts_that_fit(model, parallel, train, precision, device_bytes)
            micro = largest_micro_batch(model, parallel, train, precision, device_bytes)
            smaller = (f"train.micro_batch_size={micro} fits this layout" if micro else
                       "no micro-batch fits this layout")
            hint = ("; these fit: " + "; ".join(x.describe() for x in others[:4]) + f" (or {smaller})") if others \
                else (f"; no ZeRO stage, tp <= 8 or activation checkpointing fits: {smaller}; add devices or "
                      f"machines")
            lines.append(f"verdict: does not fit: {plan.total / GIB:.1f} GiB per rank > {usable / GIB:.1f} GiB "
                         f"{of}{hint}")
    if peak_tflops:
        seconds = step_seconds(model, parallel, train, peak_tflops, mfu)
        steps = tokens / train.global_batch_tokens
        lines += ["", f"time at MFU {mfu:.0%} of {peak_tflops:g} TFLOP/s per rank: {seconds:.2f} s per step of "
                      f"{train.global_batch_tokens:,} tokens; {tokens:.3g} tokens = {steps:,.0f} steps = "
                      f"{seconds * steps / 86400:.1f} days"]
    return "\n".join(lines), fits


def planned_model(model: ModelConfig, tokenizer_vocab_size: int) -> ModelConfig:
    """The model as planned: a vocabulary that follows the tokenizer is taken as data.tokenizer.vocab_size."""
    return model if model.vocab_size is not None else dataclasses.replace(model, vocab_size=tokenizer_vocab_size)


@dataclass
class DeviceMemory:
    """The memory one rank plans against, and where that number comes from (said in the verdict)."""

    nbytes: float
    source: str


def device_memory(parallel: ParallelConfig, workers_per_node: int | None = None) -> DeviceMemory | None:
    """What one rank may fill: parallel.device_memory_gb; else on GPUs the driver's GPU when it sees one (None
    when it does not: the GPUs are elsewhere); else, on CPU, its share of this host's RAM."""
    if parallel.device_memory_gb is not None:
        return DeviceMemory(parallel.device_memory_gb * GIB, "parallel.device_memory_gb")
    if not parallel.use_gpu:
        return host_memory_per_rank(workers_per_node or parallel.num_workers)
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return DeviceMemory(float(props.total_memory), f"the driver's GPU, {props.name}")
    return None


def host_memory_per_rank(ranks: int) -> DeviceMemory:
    """On CPU the ranks of one machine share its RAM (cluster.workers_per_node of them, or every rank when
    placement is left to Ray, which packs them onto one machine where they fit)."""
    import psutil

    total = float(psutil.virtual_memory().total)
    return DeviceMemory(total / ranks, f"host RAM {total / GIB:.1f} GiB / {ranks} rank{'s' if ranks > 1 else ''}")


def check_layout_fits(model: ModelConfig, parallel: ParallelConfig, train: TrainConfig, precision: str,
                      workers_per_node: int | None = None) -> None:
    """Refuse, before any work, a layout whose planned memory per rank exceeds what a rank has (device_memory;
    parallel.check_memory=false turns it off); nothing to check for GPUs the driver cannot see."""
    memory = device_memory(parallel, workers_per_node)
    if not parallel.check_memory or memory is None:
        return
    text, fits = report(model, parallel, train, precision, memory.nbytes, None, 0.0, 0.0, memory.source)
    if fits:
        return
    if parallel.use_gpu or parallel.device_memory_gb is not None:
        fix = f"change the layout (`pipeline plan ... --gpu-memory {memory.nbytes / GIB:.0f}GiB` shows others)"
    else:
        fix = ("on CPU the ranks of one machine share its RAM: choose a smaller model or micro-batch or fewer ranks "
               "per machine, or set parallel.device_memory_gb to the memory of one rank where the workers run on "
               "other machines")
    raise ConfigError(f"the layout does not fit the memory of a rank ({memory.source}):\n{text}\n{fix}, or pass "
                      f"parallel.check_memory=false to train anyway.")
