"""Training without Ray: the same worker function under `torchrun` or the `deepspeed` launcher.

    pipeline prepare                                   # once, on one node
    torchrun --nproc_per_node=2 -m pipeline.launch train.max_steps=1000 parallel.num_workers=2
    deepspeed --num_gpus=8 --module pipeline.launch parallel=gpu parallel.num_workers=8

Every rank composes the same config from its overrides; rank 0 opens the MLflow run and shares its id.
parallel.num_workers must equal the launcher's world size.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

log = logging.getLogger("pipeline.launch")


def main(argv: list[str] | None = None) -> None:
    import torch.distributed as dist

    from data_prep.prepare import dataset_dir, is_complete
    from pipeline.compose import compose_config
    from pipeline.config import ConfigError, run_dir_for
    from pipeline.redaction import install_log_filter, remember_secrets, scrub
    from pipeline.train.distributed import init_distributed
    from pipeline.train.driver import build_job, check_resume, finish_run, open_run
    from pipeline.train.preemption import PREEMPT_FILE, PREEMPTED_EXIT_CODE
    from pipeline.train.worker import train_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_filter()
    cfg = compose_config(list(sys.argv[1:] if argv is None else argv))
    remember_secrets(cfg.tracking.uri, cfg.cluster.storage_uri)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != cfg.parallel.num_workers:
        raise ConfigError(
            f"the launcher started {world} processes but parallel.num_workers={cfg.parallel.num_workers}: "
            f"pass parallel.num_workers={world}."
        )
    data_dir = dataset_dir(cfg.data)
    if not is_complete(data_dir):
        raise ConfigError(f"no prepared data at {data_dir}: run `pipeline prepare` with the same data overrides first.")
    init_distributed(cfg.parallel)
    rank = dist.get_rank()
    if rank != 0:
        dist.barrier()  # rank 0 resolves the resume first: a universal conversion runs once, not on every rank
    job = check_resume(cfg, build_job(cfg, data_dir, None, None))
    if rank == 0:
        dist.barrier()
    tracker = None
    if rank == 0:
        (run_dir_for(cfg) / PREEMPT_FILE).unlink(missing_ok=True)
        tracker = open_run(cfg, job, data_dir)
    ids = [tracker.uri, tracker.run_id, job.job_id] if tracker else [None, None, None]
    dist.broadcast_object_list(ids, src=0)
    job = dataclasses.replace(job, tracking_uri=ids[0], mlflow_run_id=ids[1], job_id=ids[2])
    outcome = train_worker(job)
    if outcome.failure:
        if tracker:
            tracker.close("FAILED")
        print(f"error: {scrub(outcome.failure)}", file=sys.stderr)
        sys.exit(2)
    if outcome.preempted:
        if tracker:
            tracker.close("KILLED")
        sys.exit(PREEMPTED_EXIT_CODE)
    if tracker:
        finish_run(tracker, outcome, run_dir_for(cfg), cfg.run_name)


if __name__ == "__main__":
    main()
