"""Run a function on N real CPU ranks (gloo), the way torchrun would, and collect what each returns.

Like OLMo-core's run_distributed_test: every distributed feature gets a real multi-process test.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
from ports import free_port


def _entry(fn: Callable, rank: int, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    out = Path(out_dir) / f"rank{rank}.pkl"
    try:
        result = ("ok", fn(*args))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        result = ("error", traceback.format_exc())
    with open(out, "wb") as f:
        pickle.dump(result, f)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 300) -> list[Any]:
    """fn(*args) on ranks 0..world_size-1; returns the list of their results (raises on any failure).

    A rendezvous port taken by another process between the pick and rank 0's bind (EADDRINUSE, before fn did
    anything) is retried on a new port, as torch's own distributed tests do (retry_on_connect_failures).
    """
    for attempt in range(3):
        try:
            return _run_once(fn, world_size, args, timeout_s)
        except _PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class _PortTaken(RuntimeError):
    pass


def _run_once(fn: Callable, world_size: int, args: tuple, timeout_s: float) -> list[Any]:
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [
            ctx.Process(target=_entry, args=(fn, rank, world_size, port, out_dir, args)) for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
        for p in procs:
            if p.is_alive():
                p.kill()
        results = []
        for rank in range(world_size):
            path = Path(out_dir) / f"rank{rank}.pkl"
            if not path.exists():
                raise RuntimeError(f"rank {rank} died without a result (exit code {procs[rank].exitcode})")
            status, value = pickle.loads(path.read_bytes())
            if status != "ok":
                if "EADDRINUSE" in value and "TCPStore" in value:
                    raise _PortTaken(f"rank {rank}: rendezvous port {port} was taken:\n{value}")
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results
