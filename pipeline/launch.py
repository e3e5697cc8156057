"""Training without Ray: the same worker function under `torchrun` or the `deepspeed` launcher.

    pipeline prepare                                   # once, on one node
    torchrun --nproc_per_node=2 -m pipeline.launch train.max_steps=1000 parallel.num_workers=2
    deepspeed --num_gpus=8 --module pipeline.launch parallel=gpu parallel.num_workers=8

Every rank composes the same config from its overrides; rank 0 opens the MLflow run and shares its id.
parallel.num_workers must equal the launcher's world size.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("pipeline.launch")


def main(argv: list[str] | None = None) -> None:
    """Every rank: compose the config; rank 0 resolves the run's spec and opens its MLflow run, every rank receives
    both, trains, and concludes the run (pipeline.train.driver.conclude_run: exit 2 on failure,
    PREEMPTED_EXIT_CODE when preempted)."""
    from pipeline.errors import PipelineError
    from pipeline.redaction import install_log_filter, scrub

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_filter()
    try:
        run(list(sys.argv[1:] if argv is None else argv))
    except PipelineError as err:
        print(f"error: {scrub(str(err))}", file=sys.stderr)
        sys.exit(2)


def run(overrides: list[str]) -> None:
    import time

    import torch.distributed as dist

    from data_prep.prepare import dataset_dir, is_complete
    from pipeline.compose import compose_config
    from pipeline.config import ConfigError, run_dir_for
    from pipeline.errors import PipelineError
    from pipeline.redaction import remember_secrets
    from pipeline.train.distributed import init_distributed
    from pipeline.train.driver import conclude_run, open_run, resolve_run
    from pipeline.train.preemption import PREEMPT_FILE
    from pipeline.train.run_spec import RunLink
    from pipeline.train.worker import train_worker

    cfg = compose_config(overrides)
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
    tracker, resolved = None, [None]
    if dist.get_rank() == 0:  # resolved once (a universal conversion runs once), then shared
        try:
            spec = resolve_run(cfg, data_dir)
            (run_dir_for(cfg) / PREEMPT_FILE).unlink(missing_ok=True)
            tracker = open_run(cfg, spec, data_dir)
            resolved = [(spec, RunLink(tracker.uri, tracker.run_id))]
        except PipelineError as err:  # bad input: every rank says so and exits 2 (a bug keeps its traceback)
            dist.broadcast_object_list([str(err)], src=0)
            raise
    dist.broadcast_object_list(resolved, src=0)
    if isinstance(resolved[0], str):
        raise ConfigError(f"rank 0 could not start the run: {resolved[0]}")
    spec, link = resolved[0]
    launched = time.time()
    conclude_run(cfg, spec, train_worker(spec, link), tracker, launched)


if __name__ == "__main__":
    main()
