"""Durable copies of data sets and checkpoints in an object store (cluster.storage_uri: s3://, gs://, hdfs://,
file://), for clusters whose nodes share no file system: the one storage layer.

`Mirror` maps the node's local directories (data sets, runs) to the store and is what the rest of the pipeline
calls, after a save, before a load and for a listing; without cluster.storage_uri every call is a no-op. The
owners of the directories say what makes a copy whole (pipeline.checkpoint.store_sync: the COMPLETE marker and
`latest`; data_prep.dataset_store: the manifest, blends and the partitions workers stage). `ObjectStore` below it
is the store itself through pyarrow.fs, where every name read back is contained.

output_dir stays a working directory on each node (it may be node-local). With cluster.storage_uri set:

- `pipeline prepare` uploads the finished data set to <uri>/data/<name>-<fingerprint>/ (the manifest
  last: a data set without one is incomplete), and a node that lacks a data set the store holds downloads
  it instead of preparing it again;
- each checkpoint goes to <uri>/runs/<run_name>/checkpoints/<tag>/: every node's first worker uploads the
  files written on its node, then rank 0 uploads the COMPLETE marker (listing every file of every node)
  and `latest`; old tags are deleted there as they are locally;
- before training, evaluation or export reads a checkpoint, the newest complete one in the store is
  downloaded to every node that lacks it (whole tag; marker last, into a temporary directory renamed
  into place), so a job on fresh nodes, or a worker group that Ray restarted elsewhere, resumes.

Files go through pyarrow.fs (which Ray already uses), in the calling process. A checkpoint's upload runs in the
background while training goes on (pipeline.checkpoint.store_sync.CheckpointUploads; cluster.background_uploads);
it counts in the store only once its marker is there. The MLflow store is not mirrored: point tracking.uri at an
MLflow server on such clusters (training on nodes that do not see output_dir refuses to start without one).

Credentials: pyarrow's own chains (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE,
an instance or pod role; GOOGLE_APPLICATION_CREDENTIALS; Kerberos for HDFS) keep them out of the URI. A URI that
holds them (s3://KEY_ID:SECRET@bucket/prefix) works, but is shown as s3://***@bucket/prefix in every message
and log line (pipeline.redaction), pyarrow's error texts included.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from pipeline import containment
from pipeline.config import ConfigError, PipelineError
from pipeline.files import directory_lock
from pipeline.redaction import redact_uri, remember_secrets, scrub

log = logging.getLogger(__name__)

DATA_PREFIX = "data"
RUNS_PREFIX = "runs"
SCALING_PREFIX = "scaling"
SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "file")


class StorageError(PipelineError, RuntimeError):
    """The object store cannot be reached, read or written."""


def _fs_module():
    import pyarrow.fs

    return pyarrow.fs


def parse_storage_uri(uri: str, option: str = "cluster.storage_uri"):
    """(pyarrow file system, base path) for an object store URI; ConfigError naming the problem otherwise."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    shown = redact_uri(uri)
    if scheme not in SCHEMES:
        raise ConfigError(
            f"{option}={shown} is not an object store URI: use s3://bucket/prefix, gs://bucket/prefix, "
            f"hdfs://host/path or file:///absolute/path (options such as "
            f"?endpoint_override=host:9000&scheme=http go after the path)."
        )
    try:
        fs, path = _fs_module().FileSystem.from_uri(uri)
    except Exception as err:  # pyarrow raises ArrowInvalid, ArrowNotImplementedError, OSError, ...
        raise ConfigError(f"{option}={shown} cannot be opened ({type(err).__name__}: {scrub(str(err))}).") from None
    return fs, path.rstrip("/")


def contained(root: Path, name: str, what: str) -> Path:
    """root / name for a name read from the store (pipeline.containment's one rule): a crafted bucket entry must
    never make a node write, or delete, outside the directory it downloads into."""
    return containment.contained(root, name, f"the object store names {what}",
                                 "the store holds an entry this pipeline never writes; remove it from the store")


# A text object of the store (`latest`, a record) is a few hundred bytes; more is not one the pipeline wrote.
MAX_TEXT_BYTES = 1 << 20


class ObjectStore:
    """A prefix of an object store, addressed by relative paths ("data/<name>/manifest.json")."""

    def __init__(self, uri: str):
        remember_secrets(uri)
        self.uri = uri  # for pyarrow (and workers that open the store themselves); messages show `shown`
        self.shown = redact_uri(uri)
        self.fs, self.base = parse_storage_uri(uri)

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}".rstrip("/") if rel else self.base

    def exists(self, rel: str) -> bool:
        fs = _fs_module()
        return self._call(self.fs.get_file_info, self.path(rel)).type != fs.FileType.NotFound

    def read_text(self, rel: str) -> str | None:
        if not self.exists(rel):
            return None
        self._check_local_object(self.path(rel))
        with self._call(self.fs.open_input_stream, self.path(rel)) as f:
            data = f.read(MAX_TEXT_BYTES + 1)
        if len(data) > MAX_TEXT_BYTES:
            raise StorageError(f"{self.shown_path(rel)} is over {MAX_TEXT_BYTES} bytes, not a text object this pipeline "
                               f"writes: remove it from the store")
        return data.decode(errors="replace")

    def shown_path(self, rel: str) -> str:
        """The object's path for messages (the store's URI without credentials, then the relative path)."""
        return f"{self.shown.split('?', 1)[0].rstrip('/')}/{rel}"

    def _check_local_object(self, path: str) -> None:
        """On a local (file://) store, refuse an object that is a symbolic link or not a regular file: the store's
        files are read with the node's own permissions, so a link would read outside the store."""
        if self.fs.type_name != "local":
            return
        self._no_local_links(path)
        if not containment.is_regular_file(path) and os.path.lexists(path):
            raise StorageError(f"the object store holds {path!r}, which is a symbolic link or not a regular file: "
                               f"this pipeline never writes those; remove it from the store")

    def _no_local_links(self, path: str) -> None:
        """No part of a local store's path below its base is a symbolic link (a linked prefix would list and read
        a directory outside the store)."""
        rel = os.path.relpath(path, self.base)
        if rel in (".", ""):
            return
        try:
            containment.contained(self.base, rel, "the object store's path",
                                  "this pipeline never writes links into a store; remove it from the store")
        except containment.ContainmentError as err:
            raise StorageError(str(err)) from None

    def _local_files(self, root: str) -> dict[str, int]:
        """files() of a local store, walked without following links (pyarrow's recursive listing follows them,
        into loops); a link or a special file is refused."""
        found: dict[str, int] = {}
        self._no_local_links(root)
        for directory, dirs, names in os.walk(root, followlinks=False):
            for name in [*dirs, *names]:
                path = os.path.join(directory, name)
                st = os.lstat(path)
                if stat.S_ISDIR(st.st_mode):
                    continue
                if not stat.S_ISREG(st.st_mode):
                    raise StorageError(f"the object store holds {path!r}, which is a symbolic link or not a regular "
                                       f"file: this pipeline never writes those; remove it from the store")
                if not name.startswith("."):  # not temporary uploads
                    found[os.path.relpath(path, root).replace(os.sep, "/")] = st.st_size
        return found

    def write_text(self, rel: str, text: str) -> None:
        self._call(self.fs.create_dir, self.path(rel).rsplit("/", 1)[0], recursive=True)
        with self._call(self.fs.open_output_stream, self.path(rel)) as f:
            f.write(text.encode())

    def files(self, rel: str) -> dict[str, int]:
        """{path relative to rel: size} of every file below rel ({} when there is none)."""
        fs = _fs_module()
        root = self.path(rel)
        if self.fs.type_name == "local":
            return self._local_files(root)
        infos = self._call(self.fs.get_file_info, fs.FileSelector(root, recursive=True, allow_not_found=True))
        return {i.path[len(root) + 1:]: i.size for i in infos
                if i.type == fs.FileType.File and not i.base_name.startswith(".")}  # not temporary uploads

    def upload_dir(self, local: Path, rel: str, marker: str | None = None, only: set[str] | None = None) -> int:
        """Copy the files below `local` to rel (those already there at the same size are skipped), `marker`
        last (when given and present). `only`: names relative to local to upload (default: all). Returns
        the number of files copied."""
        remote = self.files(rel)
        names = containment.tree_files(local, f"the directory {local} to upload holds",
                                       "the pipeline uploads only regular files it wrote; remove it")
        names = [n for n in names if (only is None or n in only) and n != marker and not n.startswith(".")]
        if marker and (local / marker).is_file():
            names.append(marker)
        copied = 0
        for name in names:
            src = local / name
            if name != marker and remote.get(name) == src.stat().st_size:
                continue
            self._put(src, self.path(f"{rel}/{name}"))
            copied += 1
        return copied

    def upload_file(self, src: Path, rel: str) -> None:
        """Copy one local file to rel (atomically: see _put)."""
        self._put(Path(src), self.path(rel))

    def download_file(self, rel: str, local: Path, sha256: str | None = None) -> None:
        """Stream rel to `local` (a temporary sibling renamed into place), checking its sha256 on the way when
        given: a StorageError names a copy whose bytes are not the ones recorded, and nothing is left behind."""
        import hashlib

        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.download-{uuid.uuid4().hex[:8]}")
        digest = hashlib.sha256()
        self._check_local_object(self.path(rel))
        try:
            with self._call(self.fs.open_input_stream, self.path(rel)) as src, open(tmp, "wb") as dst:
                while chunk := self._call(src.read, 1 << 22):
                    digest.update(chunk)
                    dst.write(chunk)
            if sha256 is not None and digest.hexdigest() != sha256:
                raise StorageError(f"{self.path(rel)} in the object store has sha256 {digest.hexdigest()}, not the "
                                   f"{sha256} recorded when it was written: it was damaged in the store or on the "
                                   f"way; delete it there and run the command again")
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def _put(self, src: Path, dst: str) -> None:
        """Copy one local file to dst. S3 and GCS make an object visible only once whole; elsewhere (local
        and mounted file systems, HDFS) the copy goes to a hidden temporary name first and is then renamed,
        so that a reader (or a second node uploading the same file) never sees it half-written."""
        fs = _fs_module()
        self._call(self.fs.create_dir, dst.rsplit("/", 1)[0], recursive=True)
        atomic = self.fs.type_name in ("s3", "gcs")
        parent, _, name = dst.rpartition("/")
        target = dst if atomic else f"{parent}/.{name}.upload-{uuid.uuid4().hex[:8]}"
        self._call(fs.copy_files, str(src), target, source_filesystem=fs.LocalFileSystem(),
                   destination_filesystem=self.fs)
        if not atomic:
            self._call(self.fs.move, target, dst)

    def download_dir(self, rel: str, local: Path, marker: str) -> bool:
        """Copy rel to `local` if the store holds it complete (its marker present): into a temporary
        sibling, the marker last, then renamed into place (replacing an incomplete local copy). False when
        the store has no complete copy."""
        fs = _fs_module()
        files = self.files(rel)
        if marker not in files:
            return False
        tmp = local.with_name(f".{local.name}.download-{uuid.uuid4().hex[:8]}")
        try:
            for name in [*sorted(n for n in files if n != marker), marker]:
                dst = contained(tmp, name, f"a file of {self.shown_path(rel)}")
                dst.parent.mkdir(parents=True, exist_ok=True)
                self._check_local_object(self.path(f"{rel}/{name}"))
                self._call(fs.copy_files, self.path(f"{rel}/{name}"), str(dst), source_filesystem=self.fs,
                           destination_filesystem=fs.LocalFileSystem())
            if local.exists():
                shutil.rmtree(local)
            local.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, local)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("downloaded %d files of %s to %s", len(files), self.path(rel), local)
        return True

    def delete_dir(self, rel: str) -> None:
        if self.exists(rel):
            self._call(self.fs.delete_dir, self.path(rel))

    def check(self, timeout_s: float) -> None:
        """Write, read back and delete a probe object within timeout_s; ConfigError saying what failed."""
        probe = f".pipeline-probe-{uuid.uuid4().hex}"

        def round_trip() -> None:
            self.write_text(probe, "ok")
            if self.read_text(probe) != "ok":
                raise StorageError(f"{self.path(probe)} did not read back what was written")
            self._call(self.fs.delete_file, self.path(probe))

        # A daemon thread: a store that never answers must not hold the process at exit either.
        result: list[BaseException | None] = []

        def run() -> None:
            try:
                round_trip()
                result.append(None)
            except BaseException as err:  # handed to the caller below
                result.append(err)

        thread = threading.Thread(target=run, name="storage-check", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if not result:
            raise ConfigError(
                f"cluster.storage_uri={self.shown} did not answer within {timeout_s:g} s: check the endpoint "
                f"(endpoint_override=...), the network path to it and the credentials of this machine."
            )
        if isinstance(result[0], (StorageError, OSError)):
            raise ConfigError(
                f"cluster.storage_uri={self.shown} is not writable from here ({scrub(str(result[0]))}): check that "
                f"the bucket exists, the credentials (AWS_ACCESS_KEY_ID / GOOGLE_APPLICATION_CREDENTIALS ...) and their "
                f"permissions."
            ) from None
        if result[0] is not None:
            raise result[0]

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as err:
            raise StorageError(f"object store {self.shown}: {scrub(str(err))}") from None


class Mirror:
    """This node's data sets and runs, mirrored to cluster.storage_uri: the one object the rest of the pipeline
    calls after a save (push), before a load (pull) and for a listing. Without a store (cluster.storage_uri
    null) every call is a no-op (a listing is the local one), so callers do only local work and never branch on
    the store.

    A local path maps to the store by the root it lies below: a data set directory below `data_root` to
    data/<name>/..., a path below `runs_root` (output_dir/runs) to runs/<run name>/..., and the scaling fits below
    `scaling_root` (output_dir/scaling) to scaling/.... Names read back from the store are contained below the
    local directory they download into (ObjectStore.download_dir)."""

    def __init__(self, storage_uri: str | None, *, data_root: Path | str | None = None,
                 runs_root: Path | str | None = None, scaling_root: Path | str | None = None):
        self.store = ObjectStore(storage_uri) if storage_uri else None
        self.roots = [(Path(root), prefix) for root, prefix in
                      ((data_root, DATA_PREFIX), (runs_root, RUNS_PREFIX), (scaling_root, SCALING_PREFIX))
                      if root is not None]

    @property
    def active(self) -> bool:
        """Whether there is a store: the nodes may then share no file system (a node's copy of a checkpoint tag
        is its own staging copy; the store holds the whole)."""
        return self.store is not None

    @property
    def uri(self) -> str:
        """The store's URI for workers that open the mirror themselves ("" without one)."""
        return self.store.uri if self.store is not None else ""

    @property
    def shown(self) -> str:
        return self.store.shown if self.store is not None else "(no object store)"

    def covers(self, local: Path) -> bool:
        return any(Path(local).is_relative_to(root) for root, _ in self.roots)

    def rel(self, local: Path) -> str:
        """The store path of a local path below one of the roots (the innermost, where one holds the other; a bug
        otherwise: ValueError)."""
        local = Path(local)
        below = [(root, prefix) for root, prefix in self.roots if local.is_relative_to(root)]
        if not below:
            raise ValueError(f"{local} is below none of the mirrored directories {[str(r) for r, _ in self.roots]}")
        root, prefix = max(below, key=lambda pair: len(pair[0].parts))
        rel = local.relative_to(root)
        return prefix if rel == Path(".") else f"{prefix}/{rel.as_posix()}"

    def shown_path(self, local: Path) -> str:
        return self.store.shown_path(self.rel(local)) if self.store is not None else str(local)

    def exists(self, local: Path) -> bool:
        return self.store is not None and self.store.exists(self.rel(local))

    def read_text(self, local: Path) -> str | None:
        return self.store.read_text(self.rel(local)) if self.store is not None else None

    def write_text(self, local: Path, text: str) -> None:
        if self.store is not None:
            self.store.write_text(self.rel(local), text)

    def listing(self, local: Path) -> dict[str, int]:
        """{name relative to `local`: size} of every file below it: in the store when there is one (every node's
        uploads), else here."""
        if self.store is not None:
            return dict(sorted(self.store.files(self.rel(local)).items()))
        names = containment.tree_files(local, f"the directory {local} holds",
                                       "the pipeline writes only regular files there; remove it")
        return {name: (Path(local) / name).stat().st_size for name in names}

    def push(self, local: Path, marker: str | None = None, only: set[str] | None = None) -> int:
        """Upload the files below `local` the store lacks (ObjectStore.upload_dir; `marker` last). Returns the
        number copied."""
        if self.store is None:
            return 0
        return self.store.upload_dir(Path(local), self.rel(local), marker=marker, only=only)

    def push_file(self, src: Path, as_path: Path | None = None) -> None:
        """Upload one file to where `as_path` (default: src itself) maps in the store."""
        if self.store is not None:
            self.store.upload_file(Path(src), self.rel(as_path if as_path is not None else src))

    def pull(self, local: Path, marker: str, present: Callable[[], bool]) -> bool:
        """Download `local` whole (marker last, into a temporary sibling renamed into place) unless `present()`
        says this node holds it, once per node (a lock beside it). False when nothing was downloaded: no store,
        present here, or not complete in the store."""
        if self.store is None or present():
            return False
        with directory_lock(Path(local).with_name(f".{Path(local).name}.pulling")):
            if present():  # another worker of this node fetched it meanwhile
                return False
            return self.store.download_dir(self.rel(local), Path(local), marker)

    def pull_file(self, local: Path, from_path: Path | None = None, sha256: str | None = None) -> None:
        """Download one file from where `from_path` (default: local itself) maps, checking its sha256 if given."""
        if self.store is not None:
            self.store.download_file(self.rel(from_path if from_path is not None else local), Path(local), sha256)

    def delete(self, local: Path) -> None:
        if self.store is not None:
            self.store.delete_dir(self.rel(local))


NO_MIRROR = Mirror(None)  # for callers with no object store (tests, tools that work on one machine)


def mirror_for(cfg) -> Mirror:
    """The mirror of a config's directories (a PipelineConfig): its data sets (data.output_dir), its runs
    (output_dir/runs) and its scaling fits (output_dir/scaling)."""
    from pipeline.config import run_dir_for

    return Mirror(cfg.cluster.storage_uri, data_root=cfg.data.output_dir, runs_root=run_dir_for(cfg).parent,
                  scaling_root=Path(cfg.output_dir) / "scaling")
