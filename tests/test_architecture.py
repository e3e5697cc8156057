"""The layout is the architecture: rooms (packages) import only downward, no module imports itself back
through others, and no function grows past 100 lines.

Imports are read with `ast`, so an import inside a function counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "data_prep")
CHECKED_TREES = ("pipeline", "data_prep", "tests", "benchmarks")
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 600
# The rooms a training step runs through keep shorter functions: a newcomer reads them first.
TRAINING_ROOMS = ("pipeline/train", "pipeline/checkpoint", "pipeline/data")
MAX_TRAINING_FUNCTION_LINES = 60
MAX_TRAINING_PATH_FILES = 12

# Rooms from the top down: a room imports only rooms of a lower layer (and its own modules). A room is a
# subpackage of pipeline/ (train, checkpoint, ...), a top-level module of pipeline/ (cli, config, ...) or
# the data_prep package.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("cli", "launch"),  # entry points: `pipeline <command>`, `torchrun -m pipeline.launch`
    ("scaling",),  # sweeps: many runs of the stages, and their fits
    ("stages",),  # one function per stage
    ("train", "evaluation"),  # the work of a stage
    ("checkpoint", "data"),  # saving and resuming; reading prepared data sets into batches
    ("model", "data_prep"),  # the GPT; preparing data sets
    ("cluster", "tracking"),  # infrastructure: Ray, the object store, job submission; MLflow
    ("compose",),  # the one Hydra compose path
    ("config", "files"),  # the typed config and its errors; durable local files
    ("containment", "redaction", "hub"),  # names from outside kept under their root; secrets kept out of logs;
    # Hugging Face Hub ids fetched into local directories
    ("errors",),  # the root of the pipeline's errors
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """Project modules that one import statement of `module` names (a name imported from a package that is
    itself a module counts as that module)."""
    if isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the module's package, up level - 1 more
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, *([base] if base else [])])
        candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    found = []
    for name in candidates:
        while name and name not in known:  # `import pipeline.train.worker as w` names a module; a.b.Class its module
            name = name.rpartition(".")[0]
        if name:
            found.append(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (top level or inside functions)."""
    modules = project_modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets.update(_imported(node, name, path.name == "__init__.py", known))
        graph[name] = targets - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> b -> ... -> a) for each strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_through(min(group), graph, group) for group in groups]


def _cycle_through(start: str, graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside group (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # a strongly connected group always has one


def room(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "pipeline":
        return parts[0]
    return parts[1] if len(parts) > 1 else "pipeline"


def layer_of(name: str) -> int:
    for depth, rooms in enumerate(LAYERS):
        if name in rooms:
            return depth
    raise KeyError(name)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import between rooms that does not point to a lower layer."""
    out = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = room(module), room(target)
            if "pipeline" in (a, b) or a == b:  # the pipeline package itself (empty) and a room's own modules
                continue
            if layer_of(a) >= layer_of(b):
                out.append(f"{module} ({a}) imports {target} ({b}): {b} is not below {a}")
    return out


def test_every_room_has_a_layer():
    rooms = {room(m) for m in project_modules()} - {"pipeline"}
    unplaced = sorted(r for r in rooms if not any(r in layer for layer in LAYERS))
    assert not unplaced, f"rooms missing from LAYERS (place them in the layering): {unplaced}"


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_rooms_import_only_downward():
    violations = layer_violations(import_graph())
    assert not violations, "imports that point up or sideways:\n" + "\n".join(violations)


# Packages whose __init__ re-exports the names of its own modules (`from pipeline.config import ModelConfig`, as
# when it was one module). Importing any of their modules runs that __init__ and so imports all of them: edges
# that stay inside the room, which only imports downward. A module of the package importing the package itself
# would close a loop through the __init__ (test_no_import_cycles names it).
FACADES = ("pipeline.config",)


def test_subpackage_inits_import_nothing():
    """Importing pipeline.train.worker runs pipeline/train/__init__.py first: an import there would add edges
    that the graph above does not show. A facade's __init__ imports only its own package's modules."""
    known = set(project_modules())
    for path in sorted((ROOT / "pipeline").rglob("__init__.py")):
        tree = ast.parse(path.read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        package = module_name(path)
        if package in FACADES:
            outside = [t for n in imports for t in _imported(n, package, True, known)
                       if not t.startswith(f"{package}.")]
            assert not outside, f"{path.relative_to(ROOT)} imports {outside}: a facade re-exports its own modules only"
            continue
        assert not imports, f"{path.relative_to(ROOT)} imports; keep package __init__ files to a docstring"


@pytest.mark.parametrize(
    ("edge", "expected"),
    [
        # An upward import that closes a loop: both checks name it.
        (("pipeline.checkpoint.layout", "pipeline.train.driver"), "cycle"),
        # An upward import without a loop: the layering names it.
        (("pipeline.model.gpt", "pipeline.stages"), "layer"),
        # A sideways import between two rooms of one layer.
        (("pipeline.train.driver", "pipeline.evaluation.evaluate"), "layer"),
    ],
)
def test_checks_catch_a_broken_boundary(edge, expected):
    """The checks fail when a boundary is crossed on purpose (the real graph plus one bad import)."""
    graph = {k: set(v) for k, v in import_graph().items()}
    source, target = edge
    assert source in graph and target in graph, f"{edge} names modules that no longer exist: update the test"
    graph[source].add(target)
    violations = layer_violations(graph)
    assert any(v.startswith(f"{source} ") and target in v for v in violations), violations
    if expected == "cycle":
        cycles = find_cycles(graph)
        assert any(source in c and target in c for c in cycles), cycles


def test_cycle_finder_names_the_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_pyproject_lists_every_package():
    """A package missing from pyproject.toml works in an editable install and is absent from a wheel."""
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module_name(p.parent / "__init__.py") for pkg in PACKAGES for p in (ROOT / pkg).rglob("__init__.py")}
    assert packages <= listed, f"add to [tool.setuptools] packages: {sorted(packages - listed)}"


def functions_longer_than(limit: int, trees: tuple[str, ...]) -> list[str]:
    long = []
    for tree_name in trees:
        for path in sorted((ROOT / tree_name).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > limit:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    return long


def test_no_function_longer_than_100_lines():
    long = functions_longer_than(MAX_FUNCTION_LINES, CHECKED_TREES)
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them):\n" + "\n".join(long)


def test_no_function_longer_than_60_lines_where_a_training_step_runs():
    long = functions_longer_than(MAX_TRAINING_FUNCTION_LINES, TRAINING_ROOMS)
    assert not long, f"functions over {MAX_TRAINING_FUNCTION_LINES} lines (split them):\n" + "\n".join(long)


def test_no_module_longer_than_600_lines():
    long = [f"{path.relative_to(ROOT)} ({n} lines)" for path in project_modules().values()
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by concern):\n" + "\n".join(long)


def test_architecture_md_names_only_files_and_functions_that_exist():
    """docs/ARCHITECTURE.md is the map a newcomer reads first: every file it names exists, and every
    `function` it names beside a file is defined in that file."""
    import re

    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    paths = set(re.findall(r"`((?:pipeline|data_prep|tests)/[\w/.*]+?\.(?:py|md))`", text))
    paths |= set(re.findall(r"`((?:pipeline|data_prep)/\w+/)`", text))
    assert len(paths) > 20, "the map names too few files to be checked"
    missing = sorted(p for p in paths if "*" not in p and not (ROOT / p).exists())
    assert not missing, f"docs/ARCHITECTURE.md names files that do not exist: {missing}"
    pairs = re.findall(r"`((?:pipeline|data_prep)/[\w/]+\.py)` `(\w+)`", text)
    assert pairs, "the map names no functions to be checked"
    undefined = [f"{path}:{name}" for path, name in pairs
                 if not re.search(rf"^\s*(def|class) {name}\b|^{name}\s*=", (ROOT / path).read_text(), re.M)]
    assert not undefined, f"docs/ARCHITECTURE.md names functions its files do not define: {undefined}"
    # Any other name it gives in backticks that reads as code (snake_case or CamelCase) is defined somewhere.
    source = "\n".join(path.read_text() for path in project_modules().values())
    names = {n for n in re.findall(r"`([A-Za-z_]\w*)`", text)
             if "_" in n.strip("_") or re.search(r"[a-z][A-Z]|^[A-Z][a-z]", n)}
    assert len(names) > 20, "the map names too few functions and classes to be checked"
    stale = sorted(n for n in names if not re.search(rf"^\s*(?:def|class) {n}\b|\b{n}\s*[:=]", source, re.M))
    assert not stale, f"docs/ARCHITECTURE.md names what no module defines: {stale}"


def training_path() -> list[tuple[str, str]]:
    """The numbered steps of ARCHITECTURE.md's section from `pipeline train` to a checkpoint: (file, name)."""
    import re

    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## From `pipeline train` to a checkpoint on disk", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\d+\. `((?:pipeline|data_prep)/[\w/]+\.py)` `(\w+)`", section, re.M)


def test_the_training_path_from_the_cli_to_a_checkpoint_is_short_and_true():
    """ARCHITECTURE.md's path from `pipeline train` to a saved checkpoint: at most 12 files; each step defined
    where it says, and named (called, or dispatched through a table) by a step before it."""
    steps = training_path()
    assert len(steps) >= 10, f"the training path lists too few steps to be the path: {steps}"
    files = list(dict.fromkeys(path for path, _ in steps))
    assert len(files) <= MAX_TRAINING_PATH_FILES, f"the training path crosses {len(files)} files: {files}"
    sources: list[str] = []
    for i, (path, name) in enumerate(steps):
        text = (ROOT / path).read_text()
        node = next((n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                     and n.name == name), None)
        assert node is not None, f"step {i + 1}: {path} defines no {name}"
        if i:
            assert any(re.search(rf"\b{name}\b", s) for s in sources), (
                f"step {i + 1}: no step before it names {name} (the path has a gap)")
        # What a step reaches: its own code, and its module's tables (a dispatch by name).
        sources += [ast.get_source_segment(text, node), text if i == 0 else ""]



# The one storage layer (pipeline.cluster.storage.Mirror): the store itself is opened there, and checked by
# `pipeline submit`'s probe; everything else calls the mirror (a no-op without cluster.storage_uri).
STORE_OPENERS = {"pipeline.cluster.storage", "pipeline.cluster.submit"}


def store_branches() -> list[str]:
    """Modules outside the storage layer that open the object store or branch on having one."""
    found = []
    for module, path in project_modules().items():
        if module in STORE_OPENERS:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and any(a.name == "ObjectStore" for a in node.names):
                found.append(f"{module} imports ObjectStore (line {node.lineno}): call the Mirror")
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "store" \
                    and any(isinstance(c, ast.Constant) and c.value is None for c in node.comparators):
                found.append(f"{module} branches on `store` (line {node.lineno}): call the Mirror, a no-op without one")
    return found


def test_the_object_store_is_reached_only_through_the_mirror():
    assert store_branches() == []
