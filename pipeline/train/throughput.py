"""Tokens/s, model FLOPs utilisation and memory of a training worker."""

from __future__ import annotations

import re
import resource
import time
from dataclasses import dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class GPUSpec:
    """A GPU's datasheet: memory in GiB, dense (not 2:4 sparse) peaks in TFLOP/s."""

    memory_gib: float
    bf16_tflops: float  # tensor cores, bf16 and fp16 alike (V100: fp16 only)
    fp32_tflops: float  # plain fp32, without TF32


# Matched by name, most specific first ("A100-SXM4-80GB" before "A100").
GPUS: dict[str, GPUSpec] = {
    "A100-80GB": GPUSpec(80, 312, 19.5),
    "A100": GPUSpec(40, 312, 19.5),
    "H100": GPUSpec(80, 989, 67),
    "H200": GPUSpec(141, 989, 67),
    "B200": GPUSpec(180, 2250, 80),
    "L40S": GPUSpec(48, 362, 91.6),
    "L4": GPUSpec(24, 121, 30.3),
    "A10": GPUSpec(24, 125, 31.2),
    "V100": GPUSpec(32, 125, 15.7),
}


def gpu_by_name(name: str, memory_gib: float | None = None) -> tuple[str, GPUSpec] | None:
    """The datasheet entry of a device name as CUDA reports it ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB")
    or as a user writes it ("h100"); an A100 is told apart by its memory when given."""
    key = name.upper().replace(" ", "-")
    for known, spec in GPUS.items():
        base = known.split("-")[0]
        if known == "A100-80GB" and not ("80GB" in key or (memory_gib or 0) > 60):
            continue
        if re.search(rf"(^|[^A-Z0-9]){re.escape(base)}($|[^0-9])", key):
            return known, spec
    return None


def peak_tflops(precision: str, device: torch.device) -> tuple[float, str]:
    """The denominator of MFU and where it comes from: the datasheet's dense peak for a known GPU, else (a CPU,
    an unknown GPU) a matmul measured on this worker."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        found = gpu_by_name(props.name, props.total_memory / 2**30)
        if found is not None:
            name, spec = found
            return (spec.fp32_tflops if precision == "fp32" else spec.bf16_tflops), f"datasheet {name} {precision}"
    return measure_peak_tflops(precision, device), f"measured {precision} matmul"


def measure_peak_tflops(precision: str, device: torch.device, size: int | None = None, trials: int = 5) -> float:
    """Dense matmul throughput of this worker in TFLOP/s: the denominator of MFU when none is configured.

    The best of several short trials, so that a moment of contention does not lower the peak. The matrices
    are `size` square (default 1024 on a CPU, 8192 on a GPU, which small products leave far from its peak and
    so would overstate MFU), or smaller where one product would take over 50 ms (bf16 on a CPU without bf16
    instructions runs at a few GFLOP/s: a 2048-square product there takes seconds).
    """
    size = size or (8192 if device.type == "cuda" else 1024)
    dtype = DTYPES[precision]
    n = min(size, 256)
    while n < size:
        a = torch.randn(n, n, device=device, dtype=dtype)
        a @ a  # warm-up (thread pools, kernels)
        _sync(device)
        start = time.perf_counter()
        a @ a
        _sync(device)
        if time.perf_counter() - start > 0.05:
            break
        n *= 2
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(trials):
        _sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start) / 1e12)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: device memory on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mfu(tokens_per_s_per_worker: float, flops_per_token: float, peak_tflops: float) -> float:
    return tokens_per_s_per_worker * flops_per_token / (peak_tflops * 1e12)
