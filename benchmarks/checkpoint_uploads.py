"""What a checkpoint upload to the object store costs training, in the background against inline, through
`pipeline train` (its Ray workers, the default settings but the model size and the store), in one run.

The default data set is prepared once; then the same training run goes three times, each a fresh process as a
user's: with no object store (the local save alone: the floor), with cluster.storage_uri and uploads inline
(cluster.background_uploads=false: the save waits for the upload), and with uploads in the background (the
default). Each periodic save logs the seconds it stalled training (MLflow metric checkpoint_stall_s); the
medians are compared. Target: background stall <= 0.2 of the inline stall.

The store is a moto S3 server on loopback (--store s3, the default: an object store slower than the local disk,
as a cloud bucket is) or a file:// directory (--store file). The upload's own rate is then measured on the last
checkpoint: the pipeline's upload (pipeline.checkpoint.store_sync, file by file through pyarrow.fs) against a
plain pyarrow.fs.copy_files of the same directory to the same store, each into a fresh prefix.

    python -m benchmarks.checkpoint_uploads --d-model 512 --steps 60 --save-every 15
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.2


@contextlib.contextmanager
def store_uri(kind: str, root: Path):
    """A function of a name giving a fresh prefix of the benchmark's store."""
    if kind == "file":
        (root / "store").mkdir()
        yield lambda name: f"file://{root / 'store' / name}"
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from s3_server import moto_s3  # the tests' moto server on loopback

    with moto_s3() as endpoint:
        yield lambda name: f"s3://bucket/{name}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def train(out: Path, name: str, args, extra: list[str]) -> tuple[float, list[float]]:
    """Wall seconds of one `pipeline train`, and the checkpoint_stall_s of each periodic save."""
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", f"output_dir={out}", f"run_name={name}",
                           f"model.d_model={args.d_model}", f"model.n_layer={args.layers}",
                           f"model.d_ff={4 * args.d_model}", f"train.max_steps={args.steps}",
                           f"train.save_interval_steps={args.save_every}", "train.eval_interval_steps=0",
                           "train.keep_last_checkpoints=2", *extra], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pipeline train ({name}) failed:\n{proc.stderr[-4000:]}")
    wall = time.time() - started
    return wall, list(metric_histories(out, name, ["checkpoint_stall_s"])["checkpoint_stall_s"].values())


def metric_histories(out: Path, name: str, keys: list[str]) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} of the run `name` in out/mlflow.db (the embedded default's tracking store)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs(client.get_experiment_by_name("pipeline").experiment_id,
                             filter_string=f"tags.mlflow.runName = '{name}'")[0]
    return {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)} for key in keys}


def upload_rates(tag_dir: Path, uri_of) -> dict[str, float]:
    """MB/s of the pipeline's upload of one checkpoint tag and of a plain pyarrow copy to the same store."""
    import pyarrow.fs

    from pipeline.checkpoint.store_sync import push_checkpoint_files
    from pipeline.cluster.storage import Mirror, ObjectStore

    size_mb = sum(p.stat().st_size for p in tag_dir.iterdir() if p.is_file()) / 1e6
    mirror = Mirror(uri_of("rate-pipeline"), runs_root=tag_dir.parents[2])
    started = time.perf_counter()
    push_checkpoint_files(mirror, tag_dir)
    pipeline_s = time.perf_counter() - started
    plain = ObjectStore(uri_of("rate-plain"))
    started = time.perf_counter()
    pyarrow.fs.copy_files(str(tag_dir), plain.path("tag"), source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=plain.fs)
    plain_s = time.perf_counter() - started
    return {"checkpoint_mb": round(size_mb, 1), "pipeline_mb_s": round(size_mb / pipeline_s, 1),
            "plain_copy_mb_s": round(size_mb / plain_s, 1), "ratio": round(plain_s / pipeline_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=("s3", "file"), default="s3")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, store_uri(args.store, Path(tmp)) as uri_of:
        out = Path(tmp) / "out"
        subprocess.run([sys.executable, "-m", "pipeline.cli", "prepare", f"output_dir={out}"], check=True,
                       capture_output=True, text=True)
        report: dict[str, dict] = {}
        for mode, extra in (("local_only", []),
                            ("inline", [f"cluster.storage_uri='{uri_of('inline')}'", "cluster.background_uploads=false"]),
                            ("background", [f"cluster.storage_uri='{uri_of('background')}'"])):  # quoted: ? and = for Hydra
            wall, stalls = train(out, f"uploads-{mode}", args, extra)
            report[mode] = {"wall_s": round(wall, 1), "stall_s": [round(s, 3) for s in stalls],
                            "median_stall_s": round(statistics.median(stalls), 3)}
        last = sorted((out / "runs" / "uploads-inline" / "checkpoints").glob("step_*"))[-1]
        rates = upload_rates(last, uri_of)
    ratio = report["background"]["median_stall_s"] / report["inline"]["median_stall_s"]
    print(json.dumps({"store": args.store, "model": {"d_model": args.d_model, "layers": args.layers},
                      "runs": report, "background_over_inline_stall": round(ratio, 3),
                      "target_ratio": TARGET_RATIO, "target_met": ratio <= TARGET_RATIO, "upload_rate": rates},
                     indent=2))


if __name__ == "__main__":
    main()
