"""The CLI's one error rule, in real processes: an error the user can fix (a PipelineError, NoSpaceError) is one
line without a traceback; any other exception (FileNotFoundError included) is a bug and keeps its traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def pipeline(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def main_raising(error: str, command: list[str], patch: str, cwd) -> subprocess.CompletedProcess:
    """pipeline.cli.main(command) in a fresh process where `patch` (a module attribute the command reaches
    through the CLI's own dispatch) raises `error`."""
    module, attribute = patch.rsplit(".", 1)
    code = textwrap.dedent(f"""
        import importlib
        from pipeline.config import ConfigError
        from pipeline.files import NoSpaceError
        import pipeline.cli as cli

        def boom(*args, **kwargs):
            raise {error}

        setattr(importlib.import_module({module!r}), {attribute!r}, boom)
        cli.main({command!r})
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]


def test_a_missing_checkpoint_path_is_a_user_error_naming_it(tmp_path):
    missing = tmp_path / "no-such-run"
    proc = pipeline("checkpoint", "inspect", str(missing), cwd=tmp_path)
    assert proc.returncode == 1
    one_line_error(proc, f"{missing} does not exist: pass a checkpoint tag directory")


def test_a_directory_without_a_complete_checkpoint_is_a_user_error_naming_it(tmp_path):
    tag = tmp_path / "run" / "checkpoints" / "step_00000010"
    tag.mkdir(parents=True)
    proc = pipeline("checkpoint", "consolidate", str(tag), cwd=tmp_path)
    assert proc.returncode == 1
    one_line_error(proc, f"{tag} is not a complete checkpoint (it has no COMPLETE marker")


def test_an_unknown_subcommand_is_a_user_error(tmp_path):
    proc = pipeline("data", "frobnicate", cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc, "usage: pipeline data inspect")


# A tool command (ordinary arguments) and a config stage (inside Hydra's task), each reached through the CLI's
# own dispatch: a user error is one line with status 2, a bug a traceback with status 1.
ENTRIES = [
    pytest.param(["checkpoint", "inspect", "x"], "pipeline.checkpoint.cli.main", id="tool"),
    pytest.param(["params"], "pipeline.cli.run_stage", id="stage"),
]


@pytest.mark.parametrize("command,patch", ENTRIES)
@pytest.mark.parametrize("error,message", [
    ("ConfigError('train.lr=-1 must be positive: set train.lr')", "train.lr=-1 must be positive: set train.lr"),
    ("NoSpaceError(28, 'no space left on the device while writing x')", "no space left on the device while writing x"),
])
def test_a_user_error_is_one_line_without_a_traceback(tmp_path, command, patch, error, message):
    proc = main_raising(error, command, patch, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    one_line_error(proc, message)


@pytest.mark.parametrize("command,patch", ENTRIES)
@pytest.mark.parametrize("error", ["FileNotFoundError(2, 'No such file or directory', '/internal/cache.json')",
                                   "KeyError('step')", "ValueError('a bug')"])
def test_any_other_error_is_a_bug_and_keeps_its_traceback(tmp_path, command, patch, error):
    proc = main_raising(error, command, patch, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr and "in boom" in proc.stderr, proc.stderr[-3000:]
    assert error.split("(")[0] in proc.stderr
    assert not any(line.startswith("error: ") for line in proc.stderr.splitlines()), proc.stderr[-3000:]


def test_evaluate_without_a_prepared_data_set_is_a_user_error(tmp_path):
    proc = pipeline("evaluate", f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc, "no prepared data set at")
