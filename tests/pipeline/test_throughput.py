"""MFU's denominator: datasheet peaks for known GPUs (matched by the name CUDA reports), a measured matmul
elsewhere."""

from __future__ import annotations

import pytest
import torch

from pipeline.train.throughput import gpu_by_name, mfu, peak_tflops


@pytest.mark.parametrize(("reported", "memory_gib", "expected"), [
    ("NVIDIA H100 80GB HBM3", 79.1, "H100"),
    ("NVIDIA H200", 139.8, "H200"),
    ("NVIDIA A100-SXM4-80GB", 79.2, "A100-80GB"),
    ("NVIDIA A100-SXM4-40GB", 39.4, "A100"),
    ("NVIDIA A100-PCIE", 79.2, "A100-80GB"),  # told apart by memory
    ("NVIDIA L4", 22.5, "L4"),
    ("NVIDIA L40S", 44.5, "L40S"),
    ("NVIDIA A10", 22.1, "A10"),
    ("Tesla V100-SXM2-32GB", 31.7, "V100"),
    ("NVIDIA B200", 178.4, "B200"),
])
def test_known_gpus_are_found_by_the_name_cuda_reports(reported, memory_gib, expected):
    assert gpu_by_name(reported, memory_gib)[0] == expected


def test_unknown_devices_are_not_guessed():
    assert gpu_by_name("NVIDIA GeForce RTX 4090", 24) is None
    assert gpu_by_name("AMD Instinct MI300X", 192) is None


def test_a_cpu_measures_its_peak_and_says_so():
    value, source = peak_tflops("fp32", torch.device("cpu"))
    assert value > 0 and source == "measured fp32 matmul"
    assert mfu(1000.0, 6e6, value) == pytest.approx(1000.0 * 6e6 / (value * 1e12))
