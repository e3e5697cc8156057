"""Token shards: a versioned header, then n_windows x window_length little-endian tokens (numpy.memmap).

Header (64 bytes): magic b"GPTWINDS", then <uint32 format_version, uint32 itemsize (2 = uint16, 4 = uint32),
uint32 window_length, uint64 n_windows>, zero padding. A reader refuses a file whose magic, version or
size does not match what the manifest promises, naming the file. Shards are written under a temporary
name, fsynced and renamed; manifest.json is written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import PipelineError
from pipeline.containment import ContainmentError, contained, is_regular_file
from pipeline.files import sha256_file, write_atomic

MAGIC = b"GPTWINDS"
FORMAT_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIIQ")
MANIFEST = "manifest.json"
# A data set is built in <name>.partial beside its directory and renamed into place once complete.
PARTIAL_SUFFIX = ".partial"


def partial_dir(out: Path) -> Path:
    """Where the data set `out` is built until it is published (renamed to `out`)."""
    return out.with_name(out.name + PARTIAL_SUFFIX)


def finished_dir(partial: Path) -> Path:
    """The data set directory a partial directory becomes once published."""
    return partial.with_name(partial.name.removesuffix(PARTIAL_SUFFIX))


TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "validation")
# A manifest lists a few hundred bytes per shard; one larger than this is not one prepare wrote.
MAX_MANIFEST_BYTES = 512 << 20


class ShardError(PipelineError, RuntimeError):
    """A shard that is missing, truncated, corrupted or of an unknown format."""


class MissingDataSet(ShardError, FileNotFoundError):
    """No complete data set where one is needed (a user error: the message says how to make one); still a
    FileNotFoundError for callers that look for a missing file."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    if vocab_size <= 65_535:
        return np.dtype("<u2")
    if vocab_size <= 4_294_967_295:
        return np.dtype("<u4")
    raise ValueError(f"vocabulary of {vocab_size} tokens does not fit in uint32 token ids")


def encode_header(itemsize: int, window_length: int, n_windows: int) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION, itemsize, window_length, n_windows).ljust(HEADER_BYTES, b"\0")


def read_header(path: Path) -> tuple[int, int, int]:
    """(itemsize, window_length, n_windows) of a shard, or ShardError naming the file."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"shard {path} is truncated: its header is incomplete ({len(raw)} bytes)")
    magic, version, itemsize, window_length, n_windows = _HEADER.unpack(raw[: _HEADER.size])
    if magic != MAGIC:
        raise ShardError(f"{path} is not a token shard (bad magic {magic!r}); it is corrupted or of another format")
    if version != FORMAT_VERSION:
        raise ShardError(
            f"shard {path} has format version {version}; this reader understands version {FORMAT_VERSION}: "
            f"re-run `pipeline prepare` with this version of the pipeline."
        )
    if itemsize not in (2, 4):
        raise ShardError(f"shard {path} declares {itemsize}-byte tokens; only 2 and 4 are valid")
    return itemsize, window_length, n_windows


@dataclass
class ShardInfo:
    file: str
    n_windows: int
    n_tokens: int
    sha256: str


@dataclass
class Manifest:
    format_version: int
    vocab_size: int
    dtype: str
    window_length: int
    tokenizer_file: str
    tokenizer_sha256: str
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    splits: dict[str, list[ShardInfo]]
    # documents, tokens, windows and dropped tail tokens per split; undecodable input
    stats: dict = field(default_factory=dict)
    # Where the documents came from: source kind, path, files read.
    source: dict = field(default_factory=dict)
    # The data config fields that shaped these bytes.
    config: dict = field(default_factory=dict)
    # Per split, when data.keep_doc_boundaries: {"file", "n_documents", "sha256"} of an int64 .npy of the
    # token offsets (in the split's window stream) where documents start.
    doc_starts: dict = field(default_factory=dict)
    # {"file", "split", "sha256"} of an int64 .npy: how often each token id occurs in that split (the unigram
    # baseline of evaluation), counted by prepare.
    token_counts: dict = field(default_factory=dict)
    # The ids every document starts with (a BOS where a Hugging Face tokenizer's convention adds one; none for a
    # tokenizer prepare trained): data_prep.text_tokenizer.Specials.
    document_prefix: list[int] = field(default_factory=list)
    root: Path | None = None

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.tokenizer_file

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("root")
        return json.dumps(data, indent=2, sort_keys=True)


def load_manifest(dataset_dir: Path) -> Manifest:
    path = Path(dataset_dir) / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise MissingDataSet(f"no {MANIFEST} in {dataset_dir}: it is not a complete data set; run `pipeline prepare`")
    if not is_regular_file(path):
        raise ShardError(f"{path} is not a regular file (a link, a device or a directory): the data set is not one "
                         f"prepare wrote; delete it and re-run `pipeline prepare`")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ShardError(f"{path} is {path.stat().st_size} bytes, not a manifest prepare writes: re-run `pipeline prepare`")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ShardError(f"{path} is not valid JSON ({err}): the data set is corrupted; re-run `pipeline prepare`") from err
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        version = data.get("format_version") if isinstance(data, dict) else None
        raise ShardError(
            f"{path} has format version {version}; this reader understands version {FORMAT_VERSION}: "
            f"re-run `pipeline prepare` with this version of the pipeline"
        )
    try:
        data["splits"] = {k: [ShardInfo(**s) for s in v] for k, v in data["splits"].items()}
        manifest = Manifest(**data, root=Path(dataset_dir).resolve())
    except (KeyError, TypeError, AttributeError) as err:
        raise ShardError(f"{path} does not describe a data set ({err}): re-run `pipeline prepare`") from err
    check_manifest(manifest, path)
    return manifest


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_manifest(manifest: Manifest, path: Path) -> None:
    """Refuse a manifest whose numbers or names no prepare writes (ShardError naming it): every file it names
    must be a plain name inside the data set (pipeline.containment), the vocabulary must fit its dtype, and every
    shard's counts must agree with the window length."""
    fix = f"delete {path.parent} and run `pipeline prepare` again (or prepare it from the corpus yourself)"
    vocab, window = manifest.vocab_size, manifest.window_length
    if not (_is_count(vocab) and vocab > 0 and _is_count(window) and window > 1
            and manifest.dtype in ("<u2", "<u4") and vocab <= 2 ** (8 * np.dtype(manifest.dtype).itemsize)):
        raise ShardError(f"{path} declares vocabulary {vocab!r}, dtype {manifest.dtype!r} and window length "
                         f"{window!r}, which no prepare writes: {fix}")
    for name in ("bos_id", "eos_id", "pad_id", "unk_id"):
        value = getattr(manifest, name)
        if not isinstance(value, int) or not -1 <= value < vocab:
            raise ShardError(f"{path} declares {name}={value!r}, outside the vocabulary of {vocab} tokens: {fix}")
    prefix = manifest.document_prefix
    if not (isinstance(prefix, list) and len(prefix) <= 16
            and all(_is_count(i) and i < vocab for i in prefix)):
        raise ShardError(f"{path} declares document_prefix={prefix!r}, not a few ids of its vocabulary: {fix}")
    names = [manifest.tokenizer_file]
    for split, shards in manifest.splits.items():
        for info in shards:
            if not (_is_count(info.n_windows) and info.n_tokens == info.n_windows * window):
                raise ShardError(f"{path} lists the {split} shard {info.file!r} with {info.n_windows!r} windows and "
                                 f"{info.n_tokens!r} tokens, not whole windows of {window}: {fix}")
            names.append(info.file)
    names += [entry.get("file") for entry in [*manifest.doc_starts.values(), manifest.token_counts] if entry]
    for name in names:
        dataset_file(path.parent, name)
    if manifest.tokenizer_file not in ("tokenizer.model", "tokenizer.json"):
        raise ShardError(f"{path} names the tokenizer {manifest.tokenizer_file!r}, not tokenizer.model or "
                         f"tokenizer.json: {fix}")


def dataset_file(dataset_dir: Path, name: str) -> Path:
    """A file a manifest or a blend names, contained in its data set directory (ShardError otherwise)."""
    try:
        return contained(dataset_dir, name, f"the data set {dataset_dir} names the file",
                         f"a data set names only its own files; delete {dataset_dir} and run `pipeline prepare` again")
    except ContainmentError as err:
        raise ShardError(str(err)) from err


def shard_bytes(info: ShardInfo, dtype: np.dtype) -> int:
    """The exact size of a shard file: header plus its tokens."""
    return HEADER_BYTES + info.n_tokens * np.dtype(dtype).itemsize


def incomplete_reason(dataset_dir: Path) -> str | None:
    """None when dataset_dir holds a manifest whose tokenizer and shards are all present with the promised
    sizes (a cheap check: checksums are for `verify`); else what is missing."""
    try:
        manifest = load_manifest(dataset_dir)
    except (FileNotFoundError, ShardError) as err:
        return str(err)
    if not is_regular_file(manifest.tokenizer_path):
        return f"{manifest.tokenizer_path} is missing (or not a regular file)"
    for shards in manifest.splits.values():
        for info in shards:
            path = Path(dataset_dir) / info.file
            expected = shard_bytes(info, manifest.dtype)
            if not is_regular_file(path) or path.stat().st_size != expected:
                return f"shard {path} is missing, not a regular file or not {expected} bytes long"
    for entry in [*manifest.doc_starts.values(), *([manifest.token_counts] if manifest.token_counts else [])]:
        if not is_regular_file(Path(dataset_dir) / entry["file"]):
            return f"{Path(dataset_dir) / entry['file']} is missing (or not a regular file)"
    return None


class ShardWriter:
    """Accumulates windows of one split and writes them as shards of at most shard_windows windows."""

    def __init__(self, out_dir: Path, split: str, window_length: int, dtype: np.dtype, shard_windows: int,
                 written: list[ShardInfo] | None = None, prefix: str | None = None):
        """`written`: shards of this split already on disk (a resumed run); new shards follow them. Files are
        named <prefix>-<k>.bin (one partition's shards), or <split>_<k>.bin without a prefix."""
        self.out_dir = Path(out_dir)
        self.split = split
        self.prefix = prefix
        self.window_length = window_length
        self.dtype = np.dtype(dtype)
        self.shard_windows = max(1, shard_windows)
        self.pending: list[np.ndarray] = []
        self.pending_windows = 0
        self.shards: list[ShardInfo] = list(written or [])

    def add(self, windows: np.ndarray) -> None:
        if windows.size == 0:
            return
        if windows.ndim != 2 or windows.shape[1] != self.window_length:
            raise ValueError(f"windows of shape {windows.shape}; expected (n, {self.window_length})")
        self.pending.append(windows.astype(self.dtype, copy=False))
        self.pending_windows += len(windows)
        while self.pending_windows >= self.shard_windows:
            self._flush(self.shard_windows)

    def close(self) -> list[ShardInfo]:
        if self.pending_windows:
            self._flush(self.pending_windows)
        return self.shards

    def _flush(self, n: int) -> None:
        block = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        chunk, rest = np.ascontiguousarray(block[:n]), block[n:]
        self.pending = [rest] if len(rest) else []
        self.pending_windows = len(rest)
        k = len(self.shards)
        name = f"{self.prefix}-{k:03d}.bin" if self.prefix else f"{self.split}_{k:05d}.bin"
        header = encode_header(self.dtype.itemsize, self.window_length, n)
        body = memoryview(chunk).cast("B")
        digest = hashlib.sha256(header)
        digest.update(body)
        write_atomic(self.out_dir / name, header, body)
        self.shards.append(ShardInfo(name, n, n * self.window_length, digest.hexdigest()))


def out_of_vocabulary(path: Path, token: int, vocab_size: int) -> ShardError:
    return ShardError(f"shard {path} holds the token id {token}, outside the data set's vocabulary of {vocab_size} "
                      f"tokens: the shard is corrupted or was not written by prepare; delete {path.parent} and run "
                      f"`pipeline prepare` again")


def scan_shard(path: Path, chunk: int = 1 << 22) -> tuple[str, int]:
    """(sha256 of the shard's bytes, its largest token id; -1 when it holds none), read once in chunks."""
    itemsize = read_header(path)[0]
    digest, largest = hashlib.sha256(), -1
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
        digest.update(header)
        while block := f.read(chunk):  # chunk is a multiple of 4: blocks stay aligned on token boundaries
            digest.update(block)
            tokens = np.frombuffer(block, dtype=f"<u{itemsize}", count=len(block) // itemsize)
            if tokens.size:
                largest = max(largest, int(tokens.max()))
    return digest.hexdigest(), largest


def check_window_indices(indices, length: int) -> np.ndarray:
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= length):
        raise IndexError(f"window index out of range [0, {length})")
    return indices


def gather_windows(starts: np.ndarray, indices: np.ndarray, window_length: int, fetch) -> np.ndarray:
    """Windows at global `indices` of parts laid end to end (part p holds [starts[p], starts[p+1])), as int64 in
    the order asked: fetch(p, local indices) reads one part's rows."""
    part_of = np.searchsorted(starts, indices, side="right") - 1
    out = np.empty((len(indices), window_length), dtype=np.int64)
    for part in np.unique(part_of):
        rows = part_of == part
        out[rows] = fetch(int(part), indices[rows] - starts[part])
    return out


class WindowDataset:
    """The windows of one split, memory-mapped; index i is global across the split's shards."""

    def __init__(self, dataset_dir: Path, split: str):
        manifest = load_manifest(dataset_dir)
        if split not in manifest.splits:
            raise KeyError(f"split {split!r} is not in {dataset_dir} (it has {', '.join(manifest.splits)})")
        self.dataset_dir = Path(dataset_dir)
        self.vocab_size = manifest.vocab_size
        self.window_length = manifest.window_length
        self.dtype = np.dtype(manifest.dtype)
        self.shards = manifest.splits[split]
        self.arrays = [
            self._open_shard(self.dataset_dir / info.file, info, self.window_length, self.dtype) for info in self.shards
        ]
        counts = np.array([info.n_windows for info in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])

    @staticmethod
    def _open_shard(path: Path, info: ShardInfo, window_length: int, dtype: np.dtype) -> np.memmap:
        """Memory-map one shard after checking its size and header against the manifest."""
        if not path.exists() and not path.is_symlink():
            raise ShardError(f"shard {path} is missing: the data set is incomplete; re-run `pipeline prepare`")
        if not is_regular_file(path):
            raise ShardError(f"shard {path} is not a regular file (a link, a device or a directory): the data set is "
                             f"not one prepare wrote; delete it and re-run `pipeline prepare`")
        size = path.stat().st_size
        if size < HEADER_BYTES:
            raise ShardError(f"shard {path} is truncated: {size} bytes, shorter than its header; re-run `pipeline prepare`")
        itemsize, header_window, n_windows = read_header(path)
        expected = HEADER_BYTES + info.n_windows * window_length * dtype.itemsize
        if size != expected:
            raise ShardError(
                f"shard {path} is {'truncated' if size < expected else 'too long'}: {size} bytes, the manifest "
                f"promises {expected}; delete the data set directory and re-run `pipeline prepare`"
            )
        if (itemsize, header_window, n_windows) != (dtype.itemsize, window_length, info.n_windows):
            raise ShardError(
                f"shard {path}'s header (itemsize {itemsize}, window {header_window}, {n_windows} windows) disagrees "
                f"with the manifest ({dtype.itemsize}, {window_length}, {info.n_windows}): the data set is corrupted"
            )
        return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_windows, window_length))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def windows(self, indices: np.ndarray) -> np.ndarray:
        indices = check_window_indices(indices, len(self))
        return gather_windows(self.starts, indices, self.window_length, self._read)

    def _read(self, shard: int, local: np.ndarray) -> np.ndarray:
        """Rows of one shard, refused when a token id lies outside the vocabulary (every reader goes through
        here, so no id a model's embedding cannot index reaches a model: on a GPU it would be a device-side
        assert, on a CPU an IndexError deep in a worker)."""
        rows = self.arrays[shard][local]
        if rows.size and int(rows.max()) >= self.vocab_size:
            raise out_of_vocabulary(self.dataset_dir / self.shards[shard].file, int(rows.max()), self.vocab_size)
        return rows

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest and its token ids against the vocabulary; ShardError
        names the first bad shard."""
        for info in self.shards:
            _check_content(self.dataset_dir, self.dataset_dir / info.file, info.sha256, info, self.vocab_size)


def write_synthetic_dataset(
    root: Path, windows: np.ndarray, vocab_size: int, val_windows: int = 0, shard_windows: int | None = None,
    tokenizer: Path | None = None,
) -> Path:
    """A data set from given token windows (for tests and benchmarks), with a placeholder tokenizer file or a
    copy of a real SentencePiece model (`tokenizer`, for what reads it: bits per byte, samples)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for_vocab(vocab_size)
    splits = {}
    parts = {"train": windows[val_windows:], "validation": windows[:val_windows]}
    for split, part in parts.items():
        writer = ShardWriter(root, split, windows.shape[1], dtype, shard_windows=shard_windows or max(1, len(part)))
        writer.add(np.asarray(part))
        splits[split] = writer.close()
    write_atomic(root / TOKENIZER_FILE, Path(tokenizer).read_bytes() if tokenizer else b"synthetic")
    manifest = Manifest(
        format_version=FORMAT_VERSION, vocab_size=vocab_size, dtype=dtype.str, window_length=windows.shape[1],
        tokenizer_file=TOKENIZER_FILE, tokenizer_sha256=sha256_file(root / TOKENIZER_FILE),
        bos_id=1, eos_id=2, pad_id=3, unk_id=0, splits=splits,
    )
    write_atomic(root / MANIFEST, manifest.to_json())
    return root


VERIFIED_STAMP = ".verified.json"


def _manifest_files(manifest: Manifest) -> list[tuple[str, str, ShardInfo | None]]:
    """(file name, sha256, shard info or None for the tokenizer) of every file the training reads."""
    files: list[tuple[str, str, ShardInfo | None]] = [(manifest.tokenizer_file, manifest.tokenizer_sha256, None)]
    return files + [(info.file, info.sha256, info) for shards in manifest.splits.values() for info in shards]


def _check_present(dataset_dir: Path, manifest: Manifest, name: str, info: ShardInfo | None) -> Path:
    """The file's path, after checking that it is there as a regular file (and a shard's size and header);
    ShardError if not."""
    path = dataset_dir / name
    if info is not None:
        WindowDataset._open_shard(path, info, manifest.window_length, np.dtype(manifest.dtype))
    elif not is_regular_file(path):
        raise ShardError(f"tokenizer {path} is missing or not a regular file: the data set is incomplete; re-run "
                         f"`pipeline prepare`")
    return path


def _check_content(dataset_dir: Path, path: Path, sha256: str, info: ShardInfo | None, vocab_size: int) -> None:
    """The file's sha256 against the manifest's and, for a shard, every token id against the vocabulary (one
    read of the file for both)."""
    digest, largest = scan_shard(path) if info is not None else (sha256_file(path), -1)
    if digest != sha256:
        what = "shard" if info is not None else "tokenizer"
        raise ShardError(f"{what} {path} fails its checksum (sha256 differs from the manifest): it is "
                         f"corrupted; delete {dataset_dir} and re-run `pipeline prepare`")
    if largest >= vocab_size:
        raise out_of_vocabulary(path, largest, vocab_size)


def check_dataset_checksums(dataset_dir: Path) -> int:
    """Check the sha256 of every shard and of the tokenizer, and every token id against the vocabulary, before
    training reads them; ShardError names the first bad file. Files already verified with the same size,
    modification time and inode against the same manifest entry and vocabulary (recorded in VERIFIED_STAMP
    beside the manifest) are not read again, so a resumed run does not re-read a large data set. Returns the
    number of files read now."""
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir)
    stamp_path = dataset_dir / VERIFIED_STAMP
    try:
        stamp = json.loads(stamp_path.read_text()) if is_regular_file(stamp_path) else {}
    except (OSError, ValueError, RecursionError):
        stamp = {}
    verified, hashed = {}, 0
    for name, sha256, info in _manifest_files(manifest):
        path = _check_present(dataset_dir, manifest, name, info)
        st = path.stat()
        key = [st.st_size, st.st_mtime_ns, st.st_ino, sha256, manifest.vocab_size]
        if not isinstance(stamp, dict) or stamp.get(name) != key:
            hashed += 1
            _check_content(dataset_dir, path, sha256, info, manifest.vocab_size)
        verified[name] = key
    if hashed:
        with contextlib.suppress(OSError):  # a read-only data set: verified again next time
            write_atomic(stamp_path, json.dumps(verified, indent=0))
    return hashed


def verify_dataset(dataset_dir: Path) -> list[str]:
    """Every problem found by checking sizes, headers, sha256 and token ids of every file the manifest names;
    [] if none."""
    dataset_dir = Path(dataset_dir)
    try:
        manifest = load_manifest(dataset_dir)
    except (FileNotFoundError, ShardError) as err:
        return [str(err)]
    problems = []
    for name, sha256, info in _manifest_files(manifest):
        try:
            path = _check_present(dataset_dir, manifest, name, info)
            _check_content(dataset_dir, path, sha256, info, manifest.vocab_size)
        except ShardError as err:
            problems.append(str(err))
    for entry in manifest.doc_starts.values():
        path = dataset_dir / entry["file"]
        if not is_regular_file(path) or sha256_file(path) != entry["sha256"]:
            problems.append(f"{path} is missing, not a regular file or fails its checksum")
    return problems
