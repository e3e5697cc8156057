"""A blend: a recipe of prepared data sets and weights that the training loader samples from.

Each source of a mixture (data.source=mixture) is prepared once into its own data set, every one with the
same tokenizer; the blend directory holds only `blend.json` (the data sets and their weights) and a copy of
the tokenizer. Training draws windows from the data sets in the proportions of the weights
(pipeline.data.loader.BlendOrder), so a new weight is a new blend directory of a few kilobytes and no
re-tokenization, as Megatron-LM's blended data sets and Levanter's mixtures of caches do.

blend.json:
    format "blend", version; the shared tokenizer's file and sha256, vocabulary, dtype, window length and
    special ids (those of every component, checked when the blend is written); components: per data set its
    name, directory ("../<name>": every data set of a blend lies beside it, under the same data root; a
    prepared data set given from elsewhere is adopted there first, as hard links), weight, share (the weight
    normalised), tokenizer sha256 and windows per split. A blend read from disk or a bucket that names
    anything else is refused (pipeline.containment): it must not make a node read, download into or delete a
    directory outside the data root.

The validation split of a blend is all its components' validation windows, interleaved in proportion to
their counts (so that a budget of the first windows covers every component in its natural proportion); the
evaluate stage reports each component's validation loss beside the blend's.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_prep.shards import (
    MANIFEST,
    TOKENIZER_FILE,
    Manifest,
    ShardError,
    WindowDataset,
    check_window_indices,
    dataset_file,
    gather_windows,
    incomplete_reason,
    load_manifest,
)
from pipeline.containment import PLAIN_NAME, ContainmentError, contained, is_regular_file, tree_files
from pipeline.files import sha256_file

BLEND = "blend.json"
BLEND_VERSION = 1
MAX_BLEND_BYTES = 16 << 20  # a blend lists a few hundred bytes per data set


@dataclass
class Component:
    name: str
    dataset: str  # "../<data set directory>": beside the blend
    weight: float
    share: float
    tokenizer_sha256: str
    windows: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)


@dataclass
class Blend:
    format: str
    version: int
    tokenizer_file: str
    tokenizer_sha256: str
    vocab_size: int
    dtype: str
    window_length: int
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    components: list[Component]
    document_prefix: list[int] = field(default_factory=list)
    root: Path | None = None

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.tokenizer_file

    def component_dir(self, component: Component) -> Path:
        """The component's data set directory, beside the blend (ShardError when the blend names another)."""
        name = component.dataset.removeprefix("../")
        if component.dataset != f"../{name}" or not PLAIN_NAME.fullmatch(name):
            raise ShardError(f"the blend {self.root} names the data set {component.dataset!r} for {component.name!r}: "
                             f"a blend names only data sets beside it (../<name>); refusing it. Delete {self.root} "
                             f"and prepare the mixture again")
        try:
            return contained(self.root.parent, name, f"the blend {self.root} names the data set",
                             f"delete {self.root} and prepare the mixture again")
        except ContainmentError as err:
            raise ShardError(str(err)) from err

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.components]

    @property
    def shares(self) -> np.ndarray:
        return np.array([c.share for c in self.components], dtype=np.float64)

    def manifests(self) -> list[Manifest]:
        return [load_manifest(self.component_dir(c)) for c in self.components]

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("root")
        return json.dumps(data, indent=2, sort_keys=True)


def is_blend(directory: Path) -> bool:
    return is_regular_file(Path(directory) / BLEND)


def load_blend(directory: Path) -> Blend:
    path = Path(directory) / BLEND
    try:
        if path.stat().st_size > MAX_BLEND_BYTES:
            raise ShardError(f"{path} is {path.stat().st_size} bytes, not a blend prepare writes: re-run `pipeline "
                             f"prepare`")
        data = json.loads(path.read_text())
        if data.get("format") != "blend" or data.get("version") != BLEND_VERSION:
            raise ShardError(f"{path} is a blend of version {data.get('version')}; this reader understands "
                             f"version {BLEND_VERSION}: re-run `pipeline prepare` with this version of the pipeline")
        data["components"] = [Component(**c) for c in data["components"]]
        blend = Blend(**data, root=Path(directory).resolve())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError,
            AttributeError) as err:
        raise ShardError(f"{path} does not describe a blend ({err}): re-run `pipeline prepare`") from err
    dataset_file(blend.root, blend.tokenizer_file)
    for component in blend.components:
        blend.component_dir(component)
    return blend


def load_data_info(directory: Path) -> Manifest | Blend:
    """What a training or evaluation stage needs to know of a data set directory (vocabulary, window length,
    tokenizer, special ids): its manifest, or its blend recipe."""
    return load_blend(directory) if is_blend(directory) else load_manifest(directory)


# What every data set of a blend shares with the blend itself: the model is built from the blend's values.
SHARED_FIELDS = ("tokenizer_sha256", "vocab_size", "dtype", "window_length", "bos_id", "eos_id", "pad_id", "unk_id",
                 "document_prefix")


def check_components(blend: Blend) -> None:
    """Refuse a blend whose data sets disagree with it on the tokenizer, the vocabulary, the dtype, the window or a
    special id (ShardError naming the data set and the field): a component with a larger vocabulary than the
    blend's would feed ids past the model's embedding."""
    for component in blend.components:
        manifest = load_manifest(blend.component_dir(component))
        for key in SHARED_FIELDS:
            if getattr(manifest, key) != getattr(blend, key):
                raise ShardError(f"the blend {blend.root} has {key}={getattr(blend, key)!r} but its data set "
                                 f"{component.name!r} ({blend.component_dir(component)}) has "
                                 f"{getattr(manifest, key)!r}: delete the blend and prepare the mixture again")


def blend_incomplete_reason(directory: Path) -> str | None:
    """None when the blend and every data set it names are complete and agree with it; else what is wrong."""
    try:
        blend = load_blend(directory)
    except ShardError as err:
        return str(err)
    if not is_regular_file(blend.tokenizer_path):
        return f"{blend.tokenizer_path} is missing (or not a regular file)"
    for component in blend.components:
        reason = incomplete_reason(blend.component_dir(component))
        if reason is not None:
            return f"its data set {component.name!r}: {reason}"
    try:
        check_components(blend)
    except ShardError as err:
        return str(err)
    return None


def component_dirs(directory: Path) -> list[Path]:
    """The data set directories of a blend, or [directory] for a plain data set."""
    if not is_blend(directory):
        return [Path(directory)]
    blend = load_blend(directory)
    return [blend.component_dir(c) for c in blend.components]


def write_blend(directory: Path, parts: list[tuple[str, Path, float]]) -> Blend:
    """Write the blend of (name, data set directory, weight) at `directory`, with a copy of the tokenizer they
    share; refuse data sets that disagree on tokenizer, window length or dtype, naming the fix."""
    from pipeline.files import write_atomic

    manifests = [load_manifest(path) for _, path, _ in parts]
    first = manifests[0]
    how = (f"data.tokenizer.hf=<the checkpoint directory {parts[0][0]!r} was tokenized with>"
           if first.tokenizer_file != TOKENIZER_FILE or first.document_prefix
           else f"data.tokenizer.model_path={first.tokenizer_path}")
    for (name, path, _), manifest in zip(parts, manifests, strict=True):
        for key in SHARED_FIELDS:
            if getattr(manifest, key) != getattr(first, key):
                raise ShardError(
                    f"the mixture's data set {name!r} ({path}) has {key} {getattr(manifest, key)} but "
                    f"{parts[0][0]!r} has {getattr(first, key)}: every source of a blend needs the same tokenizer, "
                    f"special tokens and context length; prepare it with {how} and the same context length"
                )
    total = sum(weight for _, _, weight in parts)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    components = []
    for (name, path, weight), manifest in zip(parts, manifests, strict=True):
        path = Path(path).resolve()
        if path.parent != directory.resolve().parent:
            raise ShardError(f"the mixture's data set {name!r} ({path}) does not lie beside the blend {directory}: "
                             f"adopt it first (data_prep.blend.adopt_dataset)")
        components.append(Component(
            name=name, dataset=f"../{path.name}", weight=weight, share=weight / total, tokenizer_sha256=manifest.tokenizer_sha256,
            windows={s: sum(x.n_windows for x in shards) for s, shards in manifest.splits.items()},
            tokens={s: sum(x.n_tokens for x in shards) for s, shards in manifest.splits.items()},
        ))
    blend = Blend(format="blend", version=BLEND_VERSION, tokenizer_file=first.tokenizer_file,
                  tokenizer_sha256=first.tokenizer_sha256, vocab_size=first.vocab_size, dtype=first.dtype,
                  window_length=first.window_length, bos_id=first.bos_id, eos_id=first.eos_id, pad_id=first.pad_id,
                  unk_id=first.unk_id, components=components, document_prefix=first.document_prefix,
                  root=directory.resolve())
    write_atomic(directory / first.tokenizer_file, first.tokenizer_path.read_bytes())
    write_atomic(directory / BLEND, blend.to_json())  # last: its presence makes the blend
    return blend


def adopt_dataset(source: Path, data_root: Path, name: str) -> Path:
    """A prepared data set that lies outside the data root, made a data set of it (so that a blend can name it
    as ../<name>): `<name>-<manifest sha256[:12]>` below data_root, its files hard links to the source's where
    the file system allows, else copies. Reused when present with the same manifest; built in a temporary
    directory renamed into place, so a kill leaves nothing that counts."""
    source = Path(source).resolve()
    data_root = Path(data_root).resolve()
    if source.parent == data_root:
        return source
    digest = sha256_file(source / MANIFEST)
    dest = data_root / f"{name}-{digest[:12]}"
    if incomplete_reason(dest) is None and sha256_file(dest / MANIFEST) == digest:
        return dest
    names = tree_files(source, f"the data set {source} holds", "a data set holds only regular files; prepare it again")
    partial = dest.with_name(f".{dest.name}.adopting")
    shutil.rmtree(partial, ignore_errors=True)
    for rel in sorted(names, key=lambda n: n == MANIFEST):  # the manifest last
        if rel.startswith("."):
            continue
        target = partial / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.hardlink_to(source / rel)
        except OSError:
            shutil.copy2(source / rel, target)
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    return dest


class ConcatWindows:
    """The windows of several data sets' split, one after the other: index i is global across them. A blend's
    training split carries its shares (the loader samples by them); its validation split is interleaved:
    window j of a part of n windows sits at the place of (j + 0.5) / n among all parts' windows."""

    def __init__(self, parts: list[WindowDataset], names: list[str], shares: np.ndarray | None = None,
                 interleave: bool = False):
        if len({p.window_length for p in parts}) > 1:
            raise ShardError("the blend's data sets have windows of different lengths: prepare them with the same "
                             "context length")
        self.parts, self.names, self.shares = parts, names, shares
        self.window_length = parts[0].window_length
        self.dtype = parts[0].dtype
        self.lengths = np.array([len(p) for p in parts], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])
        self.order = None
        if interleave and len(parts) > 1:
            keys = np.concatenate([(np.arange(n) + 0.5) / n for n in self.lengths if n])
            self.order = np.argsort(keys, kind="stable")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def windows(self, indices: np.ndarray) -> np.ndarray:
        indices = check_window_indices(indices, len(self))
        if self.order is not None:
            indices = self.order[indices]
        return gather_windows(self.starts, indices, self.window_length, lambda p, local: self.parts[p].windows(local))


def open_split(directory: Path, split: str) -> WindowDataset | ConcatWindows:
    """The windows of one split of a data set directory: a plain data set's, or a blend's components' (the
    training split then carries the shares the loader samples by)."""
    if not is_blend(directory):
        return WindowDataset(directory, split)
    blend = load_blend(directory)
    check_components(blend)
    parts = [WindowDataset(blend.component_dir(c), split) for c in blend.components]
    if split == "train":
        return ConcatWindows(parts, blend.names, blend.shares)
    return ConcatWindows(parts, blend.names, interleave=True)


def component_splits(directory: Path, split: str) -> list[tuple[str, WindowDataset]]:
    """(name, windows) of each component of a blend (empty for a plain data set)."""
    if not is_blend(directory):
        return []
    blend = load_blend(directory)
    return [(c.name, WindowDataset(blend.component_dir(c), split)) for c in blend.components]
