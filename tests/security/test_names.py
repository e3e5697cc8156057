"""Names from outside stay below their root: names read from a bucket, names inside markers and manifests, the
local `latest`, and the names a user gives that become directories.

Each hostile input is built for real (a crafted `file://` bucket, a crafted moto S3 bucket, crafted markers and
manifests on disk); each test checks the refusal and its message, and that nothing outside the run changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mirrors import data_mirror, run_mirror
from s3_server import moto_s3

from data_prep.dataset_store import pull_dataset
from data_prep.shards import ShardError, write_synthetic_dataset
from pipeline.checkpoint.layout import COMPLETE_MARKER, CheckpointError, latest_complete, verify_checkpoint
from pipeline.cluster.storage import ObjectStore, StorageError
from pipeline.containment import ContainmentError

PIPELINE = [sys.executable, "-m", "pipeline.cli"]


def snapshot(root: Path, skip: Path) -> dict[str, bytes]:
    """Every file below root except those below skip, with its bytes (links as their target)."""
    out = {}
    for directory, _dirs, files in os.walk(root):
        if Path(directory).is_relative_to(skip):
            continue
        for name in files:
            path = Path(directory) / name
            out[str(path)] = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
    return out


@pytest.fixture
def victim(tmp_path):
    """A directory outside the run, with a file that must survive."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    return victim


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(params=["file", "s3"])
def bucket(request, tmp_path):
    """(store, put(key, bytes)): a bucket the attacker writes into, as a file:// directory or a moto S3 bucket."""
    if request.param == "file":
        root = tmp_path / "bucket"
        root.mkdir()

        def put(key: str, data: bytes) -> None:
            path = root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

        return ObjectStore(f"file://{root}"), put
    import boto3

    endpoint = request.getfixturevalue("s3_endpoint")
    client = boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    prefix = tmp_path.name

    def put_s3(key: str, data: bytes) -> None:
        client.put_object(Bucket="bucket", Key=f"{prefix}/{key}", Body=data)

    return ObjectStore(f"s3://bucket/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"), put_s3


def crafted_blend(dataset: str) -> bytes:
    component = {"name": "a", "dataset": dataset, "weight": 1.0, "share": 1.0, "tokenizer_sha256": "0" * 64,
                 "windows": {"train": 1}, "tokens": {"train": 17}}
    return json.dumps({"format": "blend", "version": 1, "tokenizer_file": "tokenizer.model", "tokenizer_sha256": "0" * 64,
                       "vocab_size": 300, "dtype": "<u2", "window_length": 17, "bos_id": 1, "eos_id": 2, "pad_id": 3,
                       "unk_id": 0, "components": [component]}).encode()


@pytest.mark.parametrize("escape", ["../../../victim", "ABSOLUTE"])
def test_a_blend_from_a_bucket_cannot_name_a_directory_outside_the_data_root(bucket, tmp_path, victim, escape):
    """The hole: pulling a crafted blend deleted a directory outside the run and wrote the store's files there."""
    store, put = bucket
    escape = str(victim) if escape == "ABSOLUTE" else escape
    put("data/mix-abc/blend.json", crafted_blend(escape))
    put("data/mix-abc/tokenizer.model", b"tok")
    put("data/victim/manifest.json", b"{}")  # what a download into the victim would bring
    out = tmp_path / "out"
    before = snapshot(tmp_path, out)
    with pytest.raises(ShardError, match=r"names the data set .*victim.*beside it"):
        pull_dataset(data_mirror(store, out / "data" / "mix-abc"), out / "data" / "mix-abc")
    assert (victim / "keep.txt").read_text() == "precious"
    after = snapshot(tmp_path, out)
    assert {k: v for k, v in after.items() if "bucket" not in k} == {k: v for k, v in before.items() if "bucket" not in k}


def test_an_object_key_with_dot_dots_is_refused_before_anything_is_written(s3_endpoint, tmp_path, victim):
    """S3 keys may hold '..': a listing that names one is refused, and the download writes nothing anywhere."""
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://{s3_endpoint}", region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    prefix = tmp_path.name
    client.put_object(Bucket="bucket", Key=f"{prefix}/runs/r/checkpoints/step_00000001/../../../../../victim/evil",
                      Body=b"x")
    client.put_object(Bucket="bucket", Key=f"{prefix}/runs/r/checkpoints/step_00000001/COMPLETE", Body=b"{}")
    store = ObjectStore(f"s3://bucket/{prefix}?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1")
    local = tmp_path / "out" / "runs" / "r" / "checkpoints" / "step_00000001"
    names = store.files("runs/r/checkpoints/step_00000001")
    assert any(".." in name for name in names), f"the hostile key did not reach the listing: {sorted(names)}"
    with pytest.raises(ContainmentError, match=r"the object store names a file of .* would lie outside"):
        store.download_dir("runs/r/checkpoints/step_00000001", local, COMPLETE_MARKER)
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert not local.exists()


def test_a_latest_in_the_bucket_that_names_a_path_is_refused(bucket, tmp_path, victim):
    from pipeline.checkpoint.store_sync import pull_latest_checkpoint

    store, put = bucket
    put("runs/r/checkpoints/latest", f"../../../{victim.name}".encode())
    with pytest.raises(StorageError, match=r"names '\.\./\.\./\.\./victim', not a checkpoint tag"):
        pull_latest_checkpoint(run_mirror(store, tmp_path / "out" / "runs" / "r"), tmp_path / "out" / "runs" / "r")
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]


def test_a_link_in_a_file_bucket_is_refused_and_never_read(tmp_path):
    """A file:// bucket is read with this node's permissions: a link there would read (and upload into the run)
    a file outside the bucket. pyarrow's own listing follows links, into loops; the store walks without them."""
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t-of-this-node")
    root = tmp_path / "bucket"
    ds = root / "data" / "ds-abc"
    ds.mkdir(parents=True)
    (ds / "manifest.json").write_text("{}")
    (ds / "train_00000.bin").symlink_to(secret)
    (ds / "loop").symlink_to(ds, target_is_directory=True)
    store = ObjectStore(f"file://{root}")
    with pytest.raises(StorageError, match=r"is a symbolic link or not a regular file"):
        store.files("data/ds-abc")
    (ds / "loop").unlink()
    with pytest.raises(StorageError, match=r"train_00000.bin.* (is|passes through) the symbolic link|is a symbolic link"):
        store.download_file("data/ds-abc/train_00000.bin", tmp_path / "out" / "x.bin")
    assert not (tmp_path / "out" / "x.bin").exists()


def checkpoint_with_marker(tmp_path: Path, files: dict[str, object]) -> Path:
    tag = tmp_path / "run" / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    marker = {"step": 1, "world_size": 1, "files": {"mp_rank_00_model_states.pt": 10, **files}, "sha256": {}}
    (tag / COMPLETE_MARKER).write_text(json.dumps(marker))
    return tag


@pytest.mark.parametrize("name", ["../../outside.bin", "/etc/hostname", "sub/../../outside.bin"])
def test_a_marker_naming_a_file_outside_its_checkpoint_is_refused(tmp_path, name):
    outside = tmp_path / "run" / "outside.bin"
    outside.parent.mkdir(parents=True, exist_ok=True)
    outside.write_bytes(b"y" * 5)
    tag = checkpoint_with_marker(tmp_path, {name: 5})
    with pytest.raises(CheckpointError, match=r"COMPLETE marker of .* names the file .* (would lie outside|not a)"):
        verify_checkpoint(tag, content=True)


def test_verify_refuses_a_device_named_in_a_marker_or_a_manifest_at_once(tmp_path):
    """The hole: a marker naming a device file (through a link) made `--verify` read /dev/zero for ever."""
    tag = checkpoint_with_marker(tmp_path, {"zero": 10})
    (tag / "zero").symlink_to("/dev/zero")
    json_marker = json.loads((tag / COMPLETE_MARKER).read_text())
    json_marker["sha256"] = {"zero": "0" * 64}
    (tag / COMPLETE_MARKER).write_text(json.dumps(json_marker))
    done = subprocess.run([*PIPELINE, "checkpoint", "inspect", str(tag), "--verify"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and "names the file 'zero'" in done.stderr and "symbolic link" in done.stderr

    ds = write_synthetic_dataset(tmp_path / "ds", np.zeros((4, 17), dtype=np.int64), 300, val_windows=1)
    manifest = json.loads((ds / "manifest.json").read_text())
    manifest["splits"]["train"][0]["file"] = "/dev/zero"
    (ds / "manifest.json").write_text(json.dumps(manifest))
    done = subprocess.run([*PIPELINE, "data", "inspect", str(ds), "--verify"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and "'/dev/zero'" in done.stderr and "outside" in done.stderr


@pytest.mark.parametrize("field", ["tokenizer_file", "shard", "token_counts"])
def test_a_manifest_naming_files_outside_its_data_set_is_refused(tmp_path, field):
    from data_prep.shards import load_manifest

    ds = write_synthetic_dataset(tmp_path / "ds", np.zeros((4, 17), dtype=np.int64), 300, val_windows=1)
    (tmp_path / "secret").write_text("not data")
    manifest = json.loads((ds / "manifest.json").read_text())
    if field == "tokenizer_file":
        manifest["tokenizer_file"] = "../secret"
    elif field == "shard":
        manifest["splits"]["train"][0]["file"] = "../secret"
    else:
        manifest["token_counts"] = {"file": "../secret", "split": "train", "sha256": "0" * 64}
    (ds / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"names the file '\.\./secret'.* would lie outside"):
        load_manifest(ds)


def test_a_local_latest_naming_a_path_is_ignored_and_prune_deletes_nothing_outside(tmp_path, victim, caplog):
    from pipeline.checkpoint.layout import prune_old

    root = tmp_path / "run" / "checkpoints"
    for step in (1, 2):
        tag = root / f"step_{step:08d}"
        tag.mkdir(parents=True)
        (tag / COMPLETE_MARKER).write_text(json.dumps({"step": step, "world_size": 1, "files": {}, "sha256": {}}))
    (root / "latest").write_text(f"../../{victim.name}")
    (root / "step_00000000").symlink_to(victim, target_is_directory=True)  # a planted "tag" that is a link
    assert latest_complete(root) == root / "step_00000002"
    assert "not a checkpoint tag" in caplog.text
    prune_old(root, keep_last=1)
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert not (root / "step_00000001").exists() and (root / "step_00000002").exists()


@pytest.mark.parametrize("override", ["run_name=../../escaped", "data.name=../escaped", "run_name=/tmp/escaped"])
def test_names_the_user_gives_stay_below_output_dir(tmp_path, override):
    """`run_name=../../x` wrote outside output_dir; now every name that becomes a directory is a plain name,
    refused before any work with the fix."""
    out = tmp_path / "work" / "out"
    done = subprocess.run([*PIPELINE, "train", f"output_dir={out}", override, "train.max_steps=1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode != 0
    field = override.split("=")[0]
    assert f"{field}=" in done.stderr and "is not a plain name" in done.stderr, done.stderr[-2000:]
    assert not any((tmp_path / p).exists() for p in ("escaped", "work/escaped", "work/out/escaped"))
    assert not Path("/tmp/escaped").exists()
    assert not (out / "runs").exists()  # refused before any work


def test_a_data_set_adopted_into_a_blend_is_hard_linked_beside_it(tmp_path):
    """A mixture may name a data set prepared anywhere; the blend names only data sets beside it, so the data set
    is adopted there (hard links, the manifest last) and the blend never names a path outside its data root."""
    from data_prep.blend import adopt_dataset, load_blend, write_blend

    elsewhere = write_synthetic_dataset(tmp_path / "elsewhere" / "ds", np.ones((6, 17), dtype=np.int64), 300,
                                        val_windows=1)
    root = tmp_path / "out" / "data"
    root.mkdir(parents=True)
    adopted = adopt_dataset(elsewhere, root, "mix.a")
    assert adopted.parent == root and adopted.name.startswith("mix.a-")
    digest = hashlib.sha256((elsewhere / "manifest.json").read_bytes()).hexdigest()
    assert adopted.name == f"mix.a-{digest[:12]}"
    assert (adopted / "train_00000.bin").stat().st_ino == (elsewhere / "train_00000.bin").stat().st_ino
    assert adopt_dataset(elsewhere, root, "mix.a") == adopted  # reused
    blend = write_blend(root / "mix-1", [("a", adopted, 1.0)])
    assert [c.dataset for c in blend.components] == [f"../{adopted.name}"]
    assert load_blend(root / "mix-1").component_dir(blend.components[0]) == adopted


@pytest.mark.parametrize("field", ["shard", "token_counts", "doc_starts", "index"])
def test_a_partition_record_naming_other_files_is_refused(field):
    """Partition records come back from workers, and from the object store on a resumed prepare; their names
    become paths (downloaded into, merged from), so each must be one a worker writes for that partition."""
    from data_prep.partition_work import PartitionRecord

    record = {"index": 3, "source": 0, "documents_read": 1, "documents": {"train": 1, "validation": 0},
              "tokens": {"train": 17, "validation": 0}, "dropped_tail_tokens": {"train": 0, "validation": 0},
              "input_bytes": 10, "token_counts": "p000003-train-token_counts.npy",
              "doc_starts": {"train": "p000003-train-doc_starts.npy"},
              "shards": {"train": [{"file": "train-p000003-000.bin", "n_windows": 1, "n_tokens": 17, "sha256": "0"}],
                         "validation": []}}
    assert PartitionRecord.from_json(json.dumps(record), 3).index == 3
    if field == "shard":
        record["shards"]["train"][0]["file"] = "../../../victim/x.bin"
    elif field == "token_counts":
        record["token_counts"] = "../../victim.npy"
    elif field == "doc_starts":
        record["doc_starts"]["train"] = "/etc/passwd"
    else:
        record["index"] = 4
    with pytest.raises(ValueError, match="which no worker writes for it"):
        PartitionRecord.from_json(json.dumps(record), 3)


def test_a_linked_prefix_in_a_file_bucket_is_refused(tmp_path):
    """A data set's whole prefix as a link to a private directory of the node: neither listed nor read."""
    private = tmp_path / "private"
    private.mkdir()
    (private / "manifest.json").write_text("{}")
    (private / "id_rsa").write_text("PRIVATE KEY")
    root = tmp_path / "bucket"
    (root / "data").mkdir(parents=True)
    (root / "data" / "ds-abc").symlink_to(private, target_is_directory=True)
    store = ObjectStore(f"file://{root}")
    with pytest.raises(StorageError, match=r"passes through the symbolic link"):
        store.files("data/ds-abc")
    with pytest.raises(StorageError, match=r"passes through the symbolic link"):
        store.read_text("data/ds-abc/manifest.json")
    with pytest.raises(StorageError):
        pull_dataset(data_mirror(store, tmp_path / "out" / "data" / "ds-abc"), tmp_path / "out" / "data" / "ds-abc")
    assert not (tmp_path / "out" / "data" / "ds-abc" / "id_rsa").exists()
