"""`pipeline checkpoint inspect|consolidate <dir>`: what a checkpoint holds; one fp32 safetensors file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.checkpoint.consolidate import consolidated_state_dict
from pipeline.checkpoint.layout import (
    COMPLETE_MARKER,
    CheckpointError,
    find_tag,
    is_complete,
    verify_checkpoint,
)
from pipeline.errors import PipelineError
from pipeline.files import NoSpaceError


def inspect(tag_dir: Path, content: bool = False) -> str:
    marker = verify_checkpoint(tag_dir, content=content)
    state = marker.get("client_state", {})
    lines = [
        f"checkpoint {tag_dir}",
        f"  step {marker['step']}, samples consumed {state.get('samples_consumed')}, world size {marker.get('world_size')}",
        f"  ZeRO stage {marker.get('zero_stage')}, tensor parallel {marker.get('tensor_parallel')}, "
        f"sequence parallel {state.get('sequence_parallel', 1)}, precision {marker.get('precision')}",
        f"  config fingerprint {state.get('config_fingerprint')}, tokenizer sha256 {state.get('tokenizer_sha256')}",
        "  files:",
    ]
    files = marker.get("files", {})
    lines += [f"    {name:<48} {size / 2**20:10.2f} MiB" for name, size in files.items()]
    hashed = marker.get("sha256", {})
    checked = "sizes and sha256 verified" if content and hashed else "sizes verified"
    lines.append(f"  total {sum(files.values()) / 2**20:.2f} MiB ({checked}; {len(hashed)} of {len(files)} files "
                 f"carry the sha256 computed while they were written)")
    if state.get("math_config"):
        lines.append("  config: " + json.dumps(state["math_config"], sort_keys=True))
    return "\n".join(lines)


def consolidate(tag_dir: Path, out: Path) -> Path:
    """All shards merged into full fp32 weights (DeepSpeed's zero_to_fp32 for ZeRO; AutoTP shards concatenated)."""
    from safetensors.torch import save_file

    state = consolidated_state_dict(tag_dir)
    # safetensors stores no aliases: tied weights are written as separate (equal) tensors.
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(out), metadata={"source": str(tag_dir)})
    return out


def checkpoint_tag(path: Path) -> Path:
    """The complete checkpoint tag directory that the path given on the command line names (a tag, a checkpoints
    directory or a run directory); CheckpointError naming the path and the fix when it names none."""
    where = "pass a checkpoint tag directory (<run dir>/checkpoints/step_<n>), a checkpoints directory or a run directory"
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: {where}")
    tag_dir = find_tag(path)
    if not is_complete(tag_dir):
        raise CheckpointError(f"{tag_dir} is not a complete checkpoint (it has no {COMPLETE_MARKER} marker: not a "
                              f"checkpoint, or one interrupted while being written): {where}")
    return tag_dir


def parser() -> argparse.ArgumentParser:
    """`pipeline checkpoint`'s arguments: its subcommands are the choices of the `action` subparsers."""
    cli = argparse.ArgumentParser(prog="pipeline checkpoint", description=__doc__)
    sub = cli.add_subparsers(dest="action", required=True)
    p_inspect = sub.add_parser("inspect", help="list what a checkpoint holds and verify its files")
    p_inspect.add_argument("path", help="a checkpoint tag directory, a checkpoints directory or a run directory")
    p_inspect.add_argument("--verify", action="store_true",
                           help="also check every file's sha256 against the one recorded when it was written")
    p_cons = sub.add_parser("consolidate", help="write full fp32 weights as one safetensors file")
    p_cons.add_argument("path")
    p_cons.add_argument("--out", type=Path, default=None, help="output file (default: <tag>/model_fp32.safetensors)")
    return cli


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        tag_dir = checkpoint_tag(Path(args.path))
        if args.action == "inspect":
            print(inspect(tag_dir, content=args.verify))
        else:
            out = consolidate(tag_dir, args.out or tag_dir / "model_fp32.safetensors")
            print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    # What the user can fix (a damaged or missing checkpoint, a full disk) is one line; anything else is a bug and
    # keeps its traceback.
    except (PipelineError, NoSpaceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
