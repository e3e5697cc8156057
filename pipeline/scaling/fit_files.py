"""Where scaling fits live: output_dir/scaling/<name>/scaling_fit.json (with the points and plots beside it), and
output_dir/scaling/latest naming the newest. With cluster.storage_uri they are mirrored to scaling/ in the store,
so that `scaling plan`, `recommend` and `validate` on another machine (a job's driver on a fresh head node) find
the fit a sweep made elsewhere. What the store gives is checked: `latest` must name a directory beside it, and a
fit file is read only up to MAX_FIT_BYTES."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.cluster.storage import NO_MIRROR, Mirror
from pipeline.files import write_atomic

REPORT_FILE = "scaling_fit.json"
LATEST = "latest"
MAX_FIT_BYTES = 64 << 20  # a fit with 10,000 bootstrap replicates and points is a few MB
FIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def scaling_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "scaling"


def publish_fit(fit_dir: Path, mirror: Mirror = NO_MIRROR) -> None:
    """After a fit was written to fit_dir (output_dir/scaling/<name>): make it the latest, here and in the store."""
    latest = Path(fit_dir).parent / LATEST
    write_atomic(latest, Path(fit_dir).name)
    if mirror.active and mirror.covers(latest):
        mirror.push(fit_dir)
        mirror.push_file(latest)


def fit_file(source: str, output_dir: str | Path, mirror: Mirror = NO_MIRROR) -> Path:
    """The scaling_fit.json that `source` names: `latest` (the store's newest where there is a store, else this
    machine's), a fit directory, or the file; pulled from the store where this machine lacks it. ValueError
    says what is missing or wrong."""
    latest = scaling_dir(output_dir) / LATEST
    stored = mirror.active and mirror.covers(latest)
    if source == LATEST:
        name = ((mirror.read_text(latest) if stored else None) or
                (latest.read_text() if latest.is_file() else "")).strip()
        if not name:
            raise ValueError(f"no fit under {latest.parent}{' or in ' + mirror.shown if stored else ''}: run "
                             f"`pipeline scaling fit` (or a sweep) first, or pass prior=chinchilla")
        if not FIT_NAME.fullmatch(name) or ".." in name:
            raise ValueError(f"{latest} names {name[:100]!r}, not a fit directory beside it: write the name of one "
                             f"(e.g. a sweep id) there")
        path = latest.parent / name / REPORT_FILE
    else:
        path = Path(source)
        if path.is_dir():
            path = path / REPORT_FILE
    if stored and mirror.covers(path) and mirror.exists(path):
        mirror.pull_file(path)
    if path.is_file() and path.stat().st_size > MAX_FIT_BYTES:
        raise ValueError(f"{path} is {path.stat().st_size:,} bytes, over the {MAX_FIT_BYTES:,} a fit report takes: "
                         f"not a scaling_fit.json of `pipeline scaling fit`")
    return path
