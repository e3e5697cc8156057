"""Hugging Face Hub ids where a local checkpoint directory is expected (model.init_from, data.tokenizer.hf).

A value that is not an existing path but reads as a Hub id (`org/name`, optionally `@revision`) is downloaded once
into `<output_dir>/hub/<org>--<name>[--<revision>]` as plain files (no links) and replaced by that directory, so the
rest of the pipeline reads a local directory as ever. Only what the pipeline reads is fetched: config files,
safetensors weights and their index, tokenizer files; never pickled weights (`*.bin`, `*.pt`), never code
(`*.py`). Where the Hub is not reachable (offline, HF_HUB_OFFLINE=1, no network), the error says how to bring the
directory in by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.errors import PipelineError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
# What the pipeline reads of a checkpoint: its config, safetensors weights and tokenizer.
WANTED = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
          "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"]

COMPLETE = ".pipeline-complete"  # written once every wanted file is there


class HubError(PipelineError, ValueError):
    """A Hub id that cannot be fetched here."""


def hub_id(value: str | None) -> re.Match | None:
    """The Hub id `value` names, when it is not an existing path."""
    if not value or Path(value).expanduser().exists():
        return None
    return HUB_ID.fullmatch(value)


def local_checkpoint(value: str | None, field: str, output_dir: str, config_only: bool = False) -> str | None:
    """value, or for a Hub id the local directory it was downloaded to (see the module docstring); with config_only
    (`pipeline params`, `pipeline plan`) its config.json alone, until a stage needs the rest."""
    match = hub_id(value)
    if match is None:
        return value
    repo, revision = match.group("repo"), match.group("revision")
    target = Path(output_dir) / "hub" / "--".join([*repo.split("/"), *([revision.replace("/", "-")] if revision else [])])
    complete = target / COMPLETE
    if complete.is_file() or (config_only and (target / "config.json").is_file()):
        return str(target)
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo, revision=revision, local_dir=target, allow_patterns=["config.json"] if config_only
                          else WANTED)
    except Exception as err:  # huggingface_hub's offline, network, authorization and not-found errors
        raise HubError(
            f"{field}={value} is not a local directory, and the Hugging Face Hub did not give it ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}): download it where the Hub is reachable (`hf download "
            f"{repo} --local-dir DIR`, or save_pretrained) and set {field}=DIR"
        ) from err
    if not config_only:
        complete.write_text(f"{repo}@{revision or 'main'}\n")
    return str(target)
