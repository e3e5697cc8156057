"""`pipeline --help`, the subcommands' help and the READMEs agree with what the CLI dispatches: read from the CLI's
own tables (pipeline.cli.STAGES and TOOLS, the subcommand parsers of checkpoint, jobs and submit, the scaling CLI's
dispatch), never from a copied list."""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import cli

REPO = Path(__file__).resolve().parents[2]
# A help entry: two spaces, the command, maybe its subcommand(s) (`jobs list|status|logs|stop`), then the rest.
ENTRY = re.compile(r"^  ([a-z][\w-]*)(?: ([a-z][a-z|]*))?(?=\s|$)")


def help_entries(text: str) -> list[tuple[str, list[str], str]]:
    """(command, subcommands, the entry's text with its continuation lines) for each entry of a help text."""
    entries: list[tuple[str, list[str], str]] = []
    for line in text.splitlines():
        match = ENTRY.match(line)
        if match:
            subs = match.group(2).split("|") if match.group(2) else []
            entries.append((match.group(1), subs, line))
        elif entries and line.startswith("   ") and line.strip():  # a continuation of the entry above
            command, subs, entry = entries[-1]
            entries[-1] = (command, subs, f"{entry}\n{line}")
    return entries


@pytest.fixture(scope="module")
def pipeline_help() -> str:
    """What `pipeline --help` prints, from a real process."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def dispatched_commands() -> set[str]:
    return set(cli.CONFIG_STAGES) | set(cli.TOOLS)


def choices(parser: argparse.ArgumentParser, dest: str) -> set[str]:
    (action,) = [a for a in parser._actions if a.dest == dest]
    return set(action.choices)


def scaling_subcommands() -> set[str]:
    """What `pipeline scaling` dispatches: its COMMANDS table if it has one, else the names its main() compares
    argv[0] with (the keys of its command dict and the tuple it hands to the planning commands)."""
    from pipeline.scaling import cli as scaling_cli

    if hasattr(scaling_cli, "COMMANDS"):
        return set(scaling_cli.COMMANDS)
    tree = ast.parse(textwrap.dedent(inspect.getsource(scaling_cli.main)))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            names |= {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
        if isinstance(node, ast.Compare) and any(isinstance(op, ast.In) for op in node.ops):
            for seq in node.comparators:
                if isinstance(seq, (ast.Tuple, ast.List, ast.Set)):
                    names |= {e.value for e in seq.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    assert names, "pipeline.scaling.cli.main dispatches no name this test can read: give it a COMMANDS table"
    return names


def dispatched_subcommands() -> dict[str, set[str]]:
    """The tools that take a subcommand, with the subcommands each dispatches."""
    from pipeline.checkpoint import cli as checkpoint_cli
    from pipeline.cluster import jobs

    tables = {name: set(target) for name, target in cli.TOOLS.items() if isinstance(target, dict)}
    subparsers = [a for a in checkpoint_cli.parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {
        **tables,
        "checkpoint": set(subparsers[0].choices),
        "jobs": choices(jobs._parser(), "action"),
        "scaling": scaling_subcommands(),
    }


def test_every_table_entry_is_a_function():
    targets = [*cli.STAGES.values()]
    for target in cli.TOOLS.values():
        targets += target.values() if isinstance(target, dict) else [target]
    for module, function in targets:
        assert callable(getattr(importlib.import_module(module), function, None)), f"{module}.{function}"


def test_every_command_is_in_the_help_and_every_help_entry_is_a_command(pipeline_help):
    listed = {command for command, _, _ in help_entries(pipeline_help)}
    assert listed == dispatched_commands(), (
        f"in the help but not dispatched: {sorted(listed - dispatched_commands())}; "
        f"dispatched but not in the help: {sorted(dispatched_commands() - listed)}")


def test_every_subcommand_is_in_the_help_and_every_help_subcommand_is_dispatched(pipeline_help):
    in_help: dict[str, set[str]] = {}
    for command, subs, _ in help_entries(pipeline_help):
        if subs:
            in_help.setdefault(command, set()).update(subs)
    assert in_help == dispatched_subcommands()


def test_submit_takes_the_stages_the_help_lists():
    from pipeline.cluster.submit import SUBMITTABLE, _parser

    assert choices(_parser(), "stage") == set(SUBMITTABLE) and set(SUBMITTABLE) <= set(cli.CONFIG_STAGES)


def test_the_scaling_help_lists_what_it_dispatches():
    from pipeline.scaling import cli as scaling_cli

    assert set(re.findall(r"pipeline scaling (\w+)", scaling_cli.__doc__)) == scaling_subcommands()


def test_unknown_commands_and_subcommands_are_refused(tmp_path):
    for args in (["frobnicate"], ["data", "frobnicate"]):
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


def readme_commands(text: str) -> list[list[str]]:
    """The words after `pipeline` of every command a README shows: code lines that start with it, inline code
    that starts with it (it may wrap a line), and `python -m pipeline.cli ...`."""
    found = re.findall(r"^\s*(?:\$ )?pipeline ([^\n#`]+)", text, re.M)
    found += re.findall(r"`pipeline ([^`]+)`", text)
    found += re.findall(r"-m pipeline\.cli ([^\n#`]+)", text)
    return [words.split() for words in found if words.split()]


def placeholder(word: str) -> bool:
    return word[0] in "<[-'\"$" or "=" in word


@pytest.mark.parametrize("doc", ["README.md", "cluster/README.md"])
def test_every_command_a_readme_names_is_real(doc):
    from pipeline.cluster.submit import SUBMITTABLE

    subcommands = {**dispatched_subcommands(), "submit": set(SUBMITTABLE)}
    commands = readme_commands((REPO / doc).read_text())
    assert len(commands) > 5
    wrong = []
    for words in commands:
        if placeholder(words[0]):  # `pipeline <stage> <overrides>`
            continue
        sub = words[1] if len(words) > 1 and not placeholder(words[1]) else None
        real = words[0] in dispatched_commands()
        if not real or (words[0] in subcommands and sub and not set(sub.split("|")) <= subcommands[words[0]]):
            wrong.append(" ".join(words))
    assert not wrong, f"{doc} names commands the CLI does not have: {wrong}"


def exporter_architectures() -> tuple[set[str], set[str], str]:
    """(the keys of the table pipeline.evaluation.export builds a model by, the names architecture() returns, the
    exporter's source), read from its source (importing it would import torch)."""
    source = Path(importlib.util.find_spec("pipeline.evaluation.export").origin).read_text()
    tree = ast.parse(source)
    table: set[str] = set()
    returned: set[str] = set()
    for node in ast.walk(tree):
        # {"gpt2": _gpt2, ...}[architecture(cfg)]
        if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Dict) and isinstance(node.slice, ast.Call)
                and getattr(node.slice.func, "id", None) == "architecture"):
            table |= {k.value for k in node.value.keys}
        if isinstance(node, ast.FunctionDef) and node.name == "architecture":
            for ret in (n for n in ast.walk(node) if isinstance(n, ast.Return)):
                returned |= {c.value for c in ast.walk(ret) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    assert table and returned, "pipeline.evaluation.export has no architecture table this test can read"
    return table, returned, source


def test_the_export_help_names_every_architecture_export_writes(pipeline_help):
    table, returned, source = exporter_architectures()
    assert set(cli.EXPORT_ARCHITECTURES) == table == returned
    (export_help,) = [text for command, _, text in help_entries(pipeline_help) if command == "export"]
    for name in cli.EXPORT_ARCHITECTURES.values():
        assert name in export_help, name
        assert name in source, f"{name}: the exporter calls that architecture otherwise"
