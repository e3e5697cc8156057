"""Tokens/s, model FLOPs utilisation and memory of a training worker."""

from __future__ import annotations

import resource
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def measure_peak_tflops(precision: str, device: torch.device, size: int = 1024, seconds: float = 0.5) -> float:
    """Dense matmul throughput of this worker in TFLOP/s: the denominator of MFU when none is configured."""
    dtype = DTYPES[precision]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    _sync(device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    _sync(device)
    elapsed = time.perf_counter() - start
    return 2 * size**3 * n / elapsed / 1e12


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
