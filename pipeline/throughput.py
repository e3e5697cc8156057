"""Tokens/s, model FLOPs utilisation and memory of a training worker."""

from __future__ import annotations

import resource
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def measure_peak_tflops(precision: str, device: torch.device, size: int = 1024, trials: int = 5) -> float:
    """Dense matmul throughput of this worker in TFLOP/s: the denominator of MFU when none is configured.

    The best of several short trials, so that a moment of contention does not lower the peak.
    """
    dtype = DTYPES[precision]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(trials):
        _sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start) / 1e12)
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
