"""The object-store copies of data sets and checkpoints (cluster.storage_uri), through pyarrow.fs on file:// and
on s3:// against a local S3 API server (moto)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from mirrors import data_mirror, run_mirror
from s3_server import moto_s3

from data_prep.dataset_store import pull_dataset, push_dataset
from data_prep.shards import MANIFEST, ShardError, write_synthetic_dataset
from pipeline.checkpoint.layout import (
    COMPLETE_MARKER,
    LATEST_FILE,
    checkpoint_root,
    latest_complete,
    prune_staging,
)
from pipeline.checkpoint.store_sync import (
    pull_latest_checkpoint,
    push_checkpoint_files,
    push_checkpoint_marker,
)
from pipeline.cluster.storage import ObjectStore, StorageError
from pipeline.config import ConfigError


@pytest.fixture(scope="module")
def s3_endpoint():
    """host:port of a moto S3 server on loopback with a bucket named `bucket`."""
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        (tmp_path / "bucket").mkdir()
        return ObjectStore(f"file://{tmp_path}/bucket")
    endpoint = request.getfixturevalue("s3_endpoint")
    # A fresh prefix per test in the one bucket.
    return ObjectStore(f"s3://bucket/{tmp_path.name}?endpoint_override={endpoint}&scheme=http&region=us-east-1")


def fake_tag(run_dir, step, files):
    tag = checkpoint_root(run_dir) / f"step_{step:08d}"
    tag.mkdir(parents=True)
    for name, data in files.items():
        (tag / name).write_bytes(data)
    return tag


def test_a_data_set_goes_up_once_and_comes_down_whole(store, tmp_path):
    windows = np.random.default_rng(0).integers(0, 300, size=(20, 9))
    local = write_synthetic_dataset(tmp_path / "a" / "ds-abc", windows, 300, val_windows=2)
    assert push_dataset(data_mirror(store, local), local) == 4  # two shards, the tokenizer, the manifest
    assert push_dataset(data_mirror(store, local), local) == 0  # already there
    elsewhere = tmp_path / "b" / "ds-abc"
    assert pull_dataset(data_mirror(store, elsewhere), elsewhere)
    names = sorted(p.name for p in local.iterdir())
    assert sorted(p.name for p in elsewhere.iterdir() if p.name != ".verified.json") == names
    assert all((elsewhere / p.name).read_bytes() == p.read_bytes() for p in local.iterdir())
    assert not pull_dataset(data_mirror(store, elsewhere), elsewhere)  # complete here: nothing to fetch
    assert (elsewhere / ".verified.json").is_file()  # its checksums were checked after the download

    # A shard damaged in the store (or on the way) is named after the download.
    damaged = local.parent / "copy" / "ds-abc"
    shard = local / "train_00000.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "bad.bin").write_bytes(bytes(data))
    store._put(tmp_path / "bad.bin", store.path("data/ds-abc/train_00000.bin"))
    with pytest.raises(ShardError, match="train_00000.bin fails its checksum"):
        pull_dataset(data_mirror(store, damaged), damaged)


def test_a_blend_goes_up_and_comes_down_with_each_of_its_data_sets(store, tmp_path):
    from data_prep.blend import blend_incomplete_reason, open_split, write_blend

    rng = np.random.default_rng(1)
    root = tmp_path / "a"
    parts = [(name, write_synthetic_dataset(root / f"mix.{name}-{name}1", rng.integers(0, 300, size=(n, 9)), 300,
                                            val_windows=2), weight) for name, n, weight in (("x", 12, 3.0), ("y", 30, 1.0))]
    blend = root / "mix-b1"
    write_blend(blend, parts)
    assert push_dataset(data_mirror(store, blend), blend) == 4 + 4 + 2  # each data set's four files, the recipe and its tokenizer
    assert push_dataset(data_mirror(store, blend), blend) == 0
    elsewhere = tmp_path / "b" / "mix-b1"
    assert pull_dataset(data_mirror(store, elsewhere), elsewhere)
    assert blend_incomplete_reason(elsewhere) is None
    for name in ("mix.x-x1", "mix.y-y1"):  # beside the recipe, as on the machine that prepared them
        assert (tmp_path / "b" / name / ".verified.json").is_file()
    assert open_split(elsewhere, "train").windows(np.arange(38)).tolist() == \
        open_split(blend, "train").windows(np.arange(38)).tolist()
    assert not pull_dataset(data_mirror(store, elsewhere), elsewhere)


def test_an_upload_cut_short_leaves_only_a_hidden_file_that_nothing_reads(tmp_path):
    bucket = tmp_path / "bucket"
    store = ObjectStore(f"file://{bucket}")
    marker = json.dumps({"step": 2, "world_size": 1}).encode()
    tag = fake_tag(tmp_path / "runs" / "r", 2, {"a.pt": b"a" * 10, COMPLETE_MARKER: marker})
    (bucket / "runs/r/checkpoints/step_00000002").mkdir(parents=True)
    (bucket / "runs/r/checkpoints/step_00000002/.a.pt.upload-dead").write_bytes(b"a" * 3)  # a crashed upload
    assert store.files("runs/r/checkpoints/step_00000002") == {}
    push_checkpoint_files(run_mirror(store, tmp_path / "runs" / "r"), tag)
    push_checkpoint_marker(run_mirror(store, tmp_path / "runs" / "r"), tag)
    assert store.files("runs/r/checkpoints/step_00000002") == {"a.pt": 10, COMPLETE_MARKER: len(marker)}
    pulled = pull_latest_checkpoint(run_mirror(store, tmp_path / "fresh" / "runs" / "r"), tmp_path / "fresh" / "runs" / "r")
    assert sorted(p.name for p in pulled.iterdir()) == [COMPLETE_MARKER, "a.pt"]


def test_nodes_without_markers_keep_only_their_newest_staging_copies(tmp_path):
    run = tmp_path / "runs" / "r"
    for step in (2, 4, 6, 8):
        fake_tag(run, step, {"zero_pp_rank_1_mp_rank_00_optim_states.pt": b"o"})  # rank 1's node: no marker
    assert prune_staging(checkpoint_root(run), keep_last=2) == ["step_00000002", "step_00000004"]
    assert sorted(p.name for p in checkpoint_root(run).iterdir()) == ["step_00000006", "step_00000008"]
    assert prune_staging(checkpoint_root(run), keep_last=0) == []  # 0 keeps every checkpoint


def test_a_data_set_without_its_manifest_in_the_store_is_not_fetched(store, tmp_path):
    windows = np.random.default_rng(0).integers(0, 300, size=(20, 9))
    local = write_synthetic_dataset(tmp_path / "a" / "ds-abc", windows, 300)
    store.upload_dir(local, "data/ds-abc", only={"train_00000.bin"})  # an upload cut short: no manifest
    assert not store.exists(f"data/ds-abc/{MANIFEST}")
    assert not pull_dataset(data_mirror(store, tmp_path / "b" / "ds-abc"), tmp_path / "b" / "ds-abc")
    assert not (tmp_path / "b" / "ds-abc").exists()


def test_checkpoints_resume_on_a_machine_that_never_saw_them(store, tmp_path):
    run = tmp_path / "a" / "runs" / "r"
    for step in (2, 4):
        tag = fake_tag(run, step, {"mp_rank_00_model_states.pt": b"m" * step, "rng_rank0.pt": b"r"})
        push_checkpoint_files(run_mirror(store, run), tag)
        assert not store.exists(f"runs/r/checkpoints/{tag.name}/{COMPLETE_MARKER}")  # files first
        (tag / COMPLETE_MARKER).write_text(json.dumps({"step": step, "world_size": 1}))
        push_checkpoint_marker(run_mirror(store, run), tag)
    assert store.read_text(f"runs/r/checkpoints/{LATEST_FILE}") == "step_00000004"

    fresh = tmp_path / "b" / "runs" / "r"
    tag = pull_latest_checkpoint(run_mirror(store, fresh), fresh)
    assert tag == checkpoint_root(fresh) / "step_00000004" == latest_complete(checkpoint_root(fresh))
    assert (tag / "mp_rank_00_model_states.pt").read_bytes() == b"mmmm"
    assert not list(tag.parent.glob(".*download*"))  # the temporary directory is gone
    assert pull_latest_checkpoint(run_mirror(store, fresh), fresh) == tag  # up to date: nothing fetched

    # A newer checkpoint whose marker never reached the store is not used; the complete one is.
    newer = fake_tag(run, 6, {"mp_rank_00_model_states.pt": b"x"})
    push_checkpoint_files(run_mirror(store, run), newer)
    store.write_text(f"runs/r/checkpoints/{LATEST_FILE}", newer.name)
    assert pull_latest_checkpoint(run_mirror(store, tmp_path / "c" / "runs" / "r"), tmp_path / "c" / "runs" / "r") is None
    assert pull_latest_checkpoint(run_mirror(store, fresh), fresh) == tag


def test_the_probe_of_a_writable_store_leaves_nothing_behind(store):
    import pyarrow.fs

    store.check(timeout_s=10)  # the probe object is written, read back and deleted
    everything = pyarrow.fs.FileSelector(store.base, recursive=True, allow_not_found=True)
    assert store.fs.get_file_info(everything) == []  # hidden names included


def test_a_missing_bucket_is_named(s3_endpoint):
    with pytest.raises(ConfigError, match="is not writable from here .*Bucket 'nobucket' not found"):
        ObjectStore(f"s3://nobucket/p?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1").check(10)


def test_bad_uris_and_unwritable_stores_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not an object store URI"):
        ObjectStore("ftp://host/x")
    with pytest.raises(ConfigError, match="not an object store URI"):
        ObjectStore("/plain/path")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not writable from here"):
        ObjectStore(f"file://{tmp_path}/file/below").check(timeout_s=10)
    with pytest.raises(StorageError, match="object store"):
        ObjectStore(f"file://{tmp_path}/file/below").write_text("a", "b")


@pytest.mark.distributed
def test_a_run_continues_from_the_store_on_a_machine_with_an_empty_output_dir(tmp_path):
    """Two `pipeline train` jobs that share only the object store, as two jobs on fresh nodes would: the
    second downloads the data set instead of preparing it, and resumes from the first one's checkpoint."""

    from test_end_to_end import TINY

    (tmp_path / "bucket").mkdir()
    store = ObjectStore(f"file://{tmp_path}/bucket")
    args = [*TINY, "train.schedule=constant", "train.warmup_steps=2", "train.save_interval_steps=4", "train.eval_interval_steps=0",
            "train.log_interval_steps=4", f"cluster.storage_uri=file://{tmp_path}/bucket"]

    def train(out, steps, *extra):
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", *args, f"train.max_steps={steps}",
                               f"output_dir={out}", *extra], capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        return proc.stdout + proc.stderr

    train(tmp_path / "first", 8)  # uploads in the background (the default): the run ends once the last is in
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'first' / 'mlflow.db'}")
    [run] = client.search_runs(client.get_experiment_by_name("pipeline").experiment_id)
    [stall] = client.get_metric_history(run.info.run_id, "checkpoint_stall_s")  # the save at step 4
    assert stall.step == 4 and 0 < stall.value < 60
    [dataset] = [name for name in store.files("data") if name.endswith(MANIFEST)]
    assert store.read_text("runs/tiny-shakespeare/checkpoints/latest") == "step_00000008"
    marker = json.loads(store.read_text(f"runs/tiny-shakespeare/checkpoints/step_00000008/{COMPLETE_MARKER}"))
    stored = store.files("runs/tiny-shakespeare/checkpoints/step_00000008")
    assert marker["files"] == {k: v for k, v in stored.items() if k != COMPLETE_MARKER}  # both ranks' files

    second = tmp_path / "second"
    log = train(second, 12, "cluster.background_uploads=false")  # inline: each save waits for its upload
    assert f"using the data set {dataset.split('/')[0]} from file://" in log
    assert "trained a bpe tokenizer" not in log  # downloaded, not prepared again
    assert f"resumed from {second / 'runs' / 'tiny-shakespeare' / 'checkpoints' / 'step_00000008'}" in log
    assert latest_complete(checkpoint_root(second / "runs" / "tiny-shakespeare")).name == "step_00000012"
    assert store.read_text("runs/tiny-shakespeare/checkpoints/latest") == "step_00000012"


def test_names_from_a_crafted_store_never_reach_outside_the_run(store, tmp_path):
    """A bucket entry or a `latest` that names a path outside the target directory (absolute, or with `..`) is
    refused with a message naming it; nothing is written or deleted outside the run directory."""
    from pipeline.checkpoint.store_sync import pull_checkpoint, pull_latest_checkpoint
    from pipeline.cluster.storage import StorageError, contained
    from pipeline.containment import ContainmentError

    run_dir = tmp_path / "runs" / "r"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    for crafted in ["../../../victim", "/etc", "step_1/../../../victim"]:
        store.write_text("runs/r/checkpoints/latest", crafted)
        with pytest.raises(StorageError, match="not a checkpoint tag"):
            pull_latest_checkpoint(run_mirror(store, run_dir), run_dir)
    assert (victim / "keep.txt").read_text() == "precious"
    for bad in ["../x", "/abs/x", "a/../../x", ""]:
        with pytest.raises(ContainmentError, match="outside|not a relative path"):
            contained(tmp_path / "root", bad, "a file")
    assert contained(tmp_path / "root", "a/b.bin", "a file") == tmp_path / "root" / "a" / "b.bin"
    if store.fs.type_name == "s3":  # object keys may hold '..' (put by any S3 client); file names cannot
        import boto3

        endpoint = store.uri.split("endpoint_override=")[1].split("&")[0]
        prefix = store.base.split("/", 1)[1]
        s3 = boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1")
        s3.put_object(Bucket="bucket", Key=f"{prefix}/runs/r/checkpoints/step_00000001/../../../../escaped.txt", Body=b"x")
        store.write_text("runs/r/checkpoints/step_00000001/COMPLETE", "{}")
        with pytest.raises(ContainmentError, match="outside"):
            pull_checkpoint(run_mirror(store, run_dir), run_dir / "checkpoints" / "step_00000001")
        assert not (tmp_path / "escaped.txt").exists()


def test_without_a_store_the_mirror_does_only_local_work(tmp_path):
    """cluster.storage_uri null: every call of the one storage layer is a no-op, and a listing is the local one,
    so checkpointing, prepare and evaluation call it without branching on the store."""
    from pipeline.cluster.storage import Mirror

    run = tmp_path / "runs" / "r"
    tag = fake_tag(run, 2, {"a.pt": b"a" * 3})
    (tag / "sub").mkdir()
    (tag / "sub" / "b.pt").write_bytes(b"b")
    mirror = Mirror(None, runs_root=tmp_path / "runs")
    assert not mirror.active and mirror.uri == ""
    assert mirror.listing(tag) == {"a.pt": 3, "sub/b.pt": 1}
    assert push_checkpoint_files(mirror, tag) == 0 and mirror.push(tag) == 0
    push_checkpoint_marker(mirror, tag)
    assert not mirror.exists(tag) and mirror.read_text(tag / "a.pt") is None
    assert not mirror.pull(tmp_path / "runs" / "other", COMPLETE_MARKER, present=lambda: False)
    assert pull_latest_checkpoint(mirror, tmp_path / "runs" / "other") is None
    assert not pull_dataset(Mirror(None, data_root=tmp_path), tmp_path / "ds-abc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing written, nothing downloaded


def test_the_mirror_maps_each_local_path_below_its_innermost_root(store, tmp_path):
    """data sets to data/<name>, run files to runs/<run>/...; where data.output_dir holds output_dir/runs, a run's
    files still go to runs/; a path below no root is a bug, not a guess."""
    from pipeline.cluster.storage import Mirror

    mirror = Mirror(store.uri, data_root=tmp_path, runs_root=tmp_path / "runs")
    assert mirror.rel(tmp_path / "ds-abc" / "manifest.json") == "data/ds-abc/manifest.json"
    assert mirror.rel(tmp_path / "runs" / "r" / "checkpoints" / "latest") == "runs/r/checkpoints/latest"
    assert mirror.covers(tmp_path / "ds-abc") and not mirror.covers(tmp_path.parent / "elsewhere")
    with pytest.raises(ValueError, match="below none of the mirrored directories"):
        mirror.rel(tmp_path.parent / "elsewhere")
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "f.txt").write_text("x")
    assert mirror.push(tmp_path / "runs" / "r") == 1
    assert store.read_text("runs/r/f.txt") == "x" and mirror.listing(tmp_path / "runs" / "r") == {"f.txt": 1}
    mirror.delete(tmp_path / "runs" / "r")
    assert not store.exists("runs/r")


def test_uploads_run_one_at_a_time_in_the_background_and_their_failure_surfaces_at_the_next_wait(tmp_path):
    """CheckpointUploads: `start` returns while the upload runs; the next `start` (the next save) first waits for
    it; an upload that failed raises at the next wait, as a StorageError naming the store; inline uploads run
    inside `start`; without a store nothing runs."""
    import threading

    from pipeline.checkpoint.store_sync import CheckpointUploads
    from pipeline.cluster.storage import Mirror

    mirror = Mirror(f"file://{tmp_path / 'bucket'}", runs_root=tmp_path / "runs")
    release, order = threading.Event(), []
    uploads = CheckpointUploads(mirror, background=True)
    uploads.start(lambda: (release.wait(30), order.append("first")))
    assert order == []  # training goes on while the first upload waits
    release.set()
    uploads.start(lambda: order.append("second"))  # waits for the first before the second starts
    uploads.wait()
    assert order == ["first", "second"]

    def broken():
        raise OSError("disk full")

    uploads.start(broken)
    with pytest.raises(StorageError, match=r"uploading a checkpoint to file://.*failed: disk full"):
        uploads.wait()
    uploads.wait()  # raised once

    inline = CheckpointUploads(mirror, background=False)
    inline.start(lambda: order.append("inline"))
    assert order[-1] == "inline"
    CheckpointUploads(Mirror(None), background=True).start(lambda: order.append("no store"))
    assert order[-1] == "inline"


def test_the_stages_after_training_pull_the_checkpoints_they_name_and_a_well_formed_run_id(store, tmp_path):
    """eval.checkpoint=all pulls every tag complete in the store (not one whose marker never came), a named tag
    pulls that one; the run's MLflow run id comes along, unless the store holds something else there."""
    from pipeline.checkpoint.layout import complete_tags
    from pipeline.checkpoint.store_sync import pull_checkpoints
    from pipeline.config import ClusterConfig, DataConfig, PipelineConfig, run_dir_for
    from pipeline.stages import pull_run

    run = tmp_path / "a" / "runs" / "r"
    for step in (2, 4, 6):
        tag = fake_tag(run, step, {"mp_rank_00_model_states.pt": b"m" * step})
        push_checkpoint_files(run_mirror(store, run), tag)
        if step < 6:  # the newest never got its marker
            (tag / COMPLETE_MARKER).write_text(json.dumps({"step": step, "world_size": 1}))
            push_checkpoint_marker(run_mirror(store, run), tag)

    every = tmp_path / "b" / "runs" / "r"
    pull_checkpoints(run_mirror(store, every), every, "all")
    assert complete_tags(checkpoint_root(every)) == ["step_00000002", "step_00000004"]
    assert not (checkpoint_root(every) / "step_00000006").exists()
    one = tmp_path / "c" / "runs" / "r"
    pull_checkpoints(run_mirror(store, one), one, "step_00000002")
    assert complete_tags(checkpoint_root(one)) == ["step_00000002", "step_00000004"]  # the named one and latest

    def config(out):  # as composed: the data sets below output_dir
        return PipelineConfig(output_dir=str(out), run_name="r", data=DataConfig(output_dir=str(out / "data")),
                              cluster=ClusterConfig(storage_uri=store.uri))

    cfg = config(tmp_path / "d")
    run_id = "0123456789abcdef0123456789abcdef"
    store.write_text("runs/r/mlflow_run_id", run_id)
    pull_run(cfg)
    assert (run_dir_for(cfg) / "mlflow_run_id").read_text() == run_id
    crafted = config(tmp_path / "e")
    store.write_text("runs/r/mlflow_run_id", "../../etc/passwd\n" * 100)
    pull_run(crafted)
    assert not (run_dir_for(crafted) / "mlflow_run_id").exists()


def test_a_node_keeps_its_own_number_of_checkpoints_while_the_store_keeps_keep_last(store, tmp_path):
    """cluster.local_checkpoints=1 with train.keep_last_checkpoints=3: after four commits this node's disk holds
    the newest checkpoint, the store the newest three; an upload cut short, older than those, goes too."""
    from pipeline.checkpoint.layout import complete_tags
    from pipeline.checkpoint.store_sync import stored_tags, upload_checkpoint

    run = tmp_path / "a" / "runs" / "r"
    mirror = run_mirror(store, run)
    root = checkpoint_root(run)
    cut_short = fake_tag(run, 1, {"rng_rank1.pt": b"x"})  # another node's files whose marker never came
    push_checkpoint_files(mirror, cut_short)
    for step in (2, 4, 6, 8):
        tag = fake_tag(run, step, {"mp_rank_00_model_states.pt": b"m" * step, "rng_rank0.pt": b"r"})
        marker = {"step": step, "world_size": 1, "files": {"mp_rank_00_model_states.pt": step, "rng_rank0.pt": 1}}
        upload_checkpoint(mirror, tag, marker, keep_last=3, keep_local=1)
    assert complete_tags(root) == ["step_00000008"]
    assert stored_tags(mirror, root) == (["step_00000004", "step_00000006", "step_00000008"],) * 2
    assert store.read_text(f"runs/r/checkpoints/{LATEST_FILE}") == "step_00000008"
