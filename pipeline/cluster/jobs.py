"""`pipeline jobs list|status|logs|stop [job id] [--address http://HOST:8265]`: the jobs of a Ray cluster.

The address defaults to $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS when it is an http(s) URL (as for
`ray job`). `stop` sends SIGTERM: a training driver then asks its workers to checkpoint before they stop. The
token goes only over https or to loopback (see pipeline.cluster.submit); what is printed has credentials in URIs
replaced by *** (entrypoints and logs of jobs sent before they were kept out).
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.cluster.submit import check_jobs_address, connect, follow
from pipeline.config import ConfigError
from pipeline.redaction import scrub


def default_address() -> str | None:
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline jobs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["list", "status", "logs", "stop"])
    parser.add_argument("job_id", nargs="?", help="the id `pipeline submit` printed (not needed by list)")
    parser.add_argument("--address", default=default_address(), help="the cluster's Jobs API URL, http://HOST:8265")
    parser.add_argument("--follow", action="store_true", help="with logs: stream them until the job ends")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="seconds to wait for the cluster to answer")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.action != "list" and not args.job_id:
        print(f"error: pipeline jobs {args.action} needs a job id (see `pipeline jobs list`)", file=sys.stderr)
        return 2
    try:
        client = connect(args.address, check_jobs_address(args.address, args.timeout_s, option="--address "))
    except ConfigError as err:
        print(f"error: {scrub(str(err))}", file=sys.stderr)
        return 2
    try:
        return _act(client, args)
    except RuntimeError as err:  # e.g. an unknown job id: the Jobs API answers 404
        print(f"error: {scrub(str(err))}", file=sys.stderr)
        return 1


def _act(client, args) -> int:
    if args.action == "list":
        for info in sorted(client.list_jobs(), key=lambda info: info.start_time or 0):
            print(f"{info.submission_id}  {info.status.value:<9}  {scrub(info.entrypoint)}")
        return 0
    if args.action == "status":
        info = client.get_job_info(args.job_id)
        print(f"{info.status.value}" + (f": {scrub(info.message)}" if info.message else ""))
        return 0
    if args.action == "logs":
        if args.follow:
            print(f"job {args.job_id} ended: {follow(client, args.job_id)}")
        else:
            print(scrub(client.get_job_logs(args.job_id)), end="")
        return 0
    stopped = client.stop_job(args.job_id)
    print(f"stop requested for {args.job_id}" if stopped else f"job {args.job_id} had already ended")
    return 0
