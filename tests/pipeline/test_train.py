"""The train stage's checks on the driver, before any worker starts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from data_prep.shards import HEADER_BYTES, VERIFIED_STAMP, ShardError, write_synthetic_dataset
from pipeline.config import DataConfig, ModelConfig, PipelineConfig
from pipeline.train.driver import resolve_run


def test_a_corrupted_shard_stops_training_before_workers(tmp_path):
    windows = np.random.default_rng(0).integers(0, 500, size=(40, 17))
    data_dir = write_synthetic_dataset(tmp_path / "ds", windows, 500, val_windows=4)
    cfg = PipelineConfig(output_dir=str(tmp_path / "out"), model=ModelConfig(context_length=16),
                         data=DataConfig(context_length=16))
    assert resolve_run(cfg, data_dir).data_dir == str(data_dir)
    assert (data_dir / VERIFIED_STAMP).is_file()

    shard = data_dir / "train_00000.bin"
    data = bytearray(shard.read_bytes())
    data[HEADER_BYTES + 3] ^= 0x01  # same size and header: only the checksum tells
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="train_00000.bin fails its checksum"):
        resolve_run(cfg, data_dir)
    skip = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, verify_checksums=False))
    assert resolve_run(skip, data_dir).data_dir == str(data_dir)  # the user chose to skip the check


def test_dropout_streams_differ_per_data_parallel_replica():
    """Each data-parallel replica draws its own dropout masks (the worker seeds torch with dp_seed(seed,
    rank // tp) after the weights are built); the streams are fixed by the seed, so runs repeat."""
    import torch

    from pipeline.train.distributed import dp_seed

    seeds = [dp_seed(1337, r) for r in range(4)]
    assert len(set(seeds)) == 4 and seeds == [dp_seed(1337, r) for r in range(4)]
    assert dp_seed(7, 0) != dp_seed(1337, 0)
    masks = []
    for seed in seeds[:2]:
        torch.manual_seed(seed)
        masks.append(torch.nn.functional.dropout(torch.ones(1000), p=0.5))
    assert not torch.equal(masks[0], masks[1])


def test_preempt_waits_for_each_training_run_to_save_or_end(tmp_path):
    """`pipeline preempt` asks only runs with a TRAINING file, and reports each as saved (a checkpoint newer than
    the request), ended (its driver finished meanwhile) or timed out."""
    import os
    import socket
    import threading
    import time

    from pipeline.train.preemption import (
        PREEMPT_FILE,
        TRAINING_FILE,
        pid_namespace,
        request_checkpoints,
        write_marker,
    )

    runs = {name: tmp_path / "runs" / name for name in ("saves", "ends", "stuck", "idle")}
    for name, run in runs.items():
        (run / "checkpoints").mkdir(parents=True)
        if name != "idle":
            # A live driver's marker (this process, a fresh heartbeat): not stale.
            write_marker(run / TRAINING_FILE, {"host": socket.gethostname(), "pid": os.getpid(),
                                               "pid_namespace": pid_namespace(), "started": time.time(),
                                               "heartbeat": time.time()})

    def workers():
        time.sleep(0.3)
        (runs["saves"] / "checkpoints" / "latest").write_text("step_00000007")
        (runs["ends"] / TRAINING_FILE).unlink()

    thread = threading.Thread(target=workers)
    thread.start()
    outcome = request_checkpoints(tmp_path, wait_s=2.0, poll_s=0.05)
    thread.join()
    assert outcome == {"saves": "saved", "ends": "ended", "stuck": "timed out"}
    assert all((runs[n] / PREEMPT_FILE).exists() for n in ("saves", "ends", "stuck"))
    assert not (runs["idle"] / PREEMPT_FILE).exists()
