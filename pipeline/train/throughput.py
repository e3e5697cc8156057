"""Tokens/s, model FLOPs utilisation and memory of a training worker."""

from __future__ import annotations

import resource
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
