"""A Hugging Face checkpoint's own tokenizer (data.tokenizer.hf=<directory>), as a data set's tokenizer.

The directory's tokenizer.json (a `tokenizers` fast tokenizer: GPT-2, Llama 3, Qwen and most published models), else
its SentencePiece tokenizer.model; slow-tokenizer files alone (vocab.json and merges.txt) are refused with the
conversion to run. Its conventions come from tokenizer_config.json (and special_tokens_map.json, then config.json's
ids) as transformers reads them:

    EOS      eos_token (ends every document; a directory that names none is refused: documents could not be told
             apart)
    prefix   [BOS] where add_bos_token is set, else the ids the tokenizer's own post-processor puts before a text
             (Llama 3's <|begin_of_text|>; none for GPT-2 and Qwen)
    BOS, PAD, UNK  bos_token, pad_token, unk_token where named

Everything read is untrusted input: each file is a regular file in the directory (no link followed), of bounded
size, parsed as JSON (or a SentencePiece protobuf); no tokenizer code is imported or run (no AutoTokenizer, no
trust_remote_code).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

from data_prep.shards import TOKENIZER_FILE
from data_prep.text_tokenizer import (
    HF_TOKENIZER_FILE,
    Specials,
    TextTokenizer,
    plain_tokenizer,
    tokenizer_from_bytes,
)
from data_prep.tokenizer import TokenizerError
from pipeline.containment import ContainmentError, regular_file

log = logging.getLogger("data_prep.prepare")

MAX_TOKENIZER_BYTES = 256 << 20  # Gemma's tokenizer.json, among the largest published, is 33 MB
MAX_CONFIG_BYTES = 16 << 20  # tokenizer_config.json with a chat template: kilobytes to a few hundred


def _read_json(path: Path, what: str) -> dict:
    regular_file(path, what, "replace it with a regular file (links are not followed)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise TokenizerError(f"{what} {path} is larger than {MAX_CONFIG_BYTES} bytes: not a tokenizer configuration")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # unreadable, not UTF-8, not JSON, an absurd number
        raise TokenizerError(f"{what} {path} is not JSON ({err})") from err
    if not isinstance(value, dict):
        raise TokenizerError(f"{what} {path} holds no JSON object")
    return value


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken's {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HFTokenizerSource:
    """data.tokenizer.hf's directory, read (see the module docstring): which file, and its conventions."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()
        where = f"data.tokenizer.hf={directory}"
        if not self.directory.is_dir():
            raise TokenizerError(f"{where} is not a directory: give a local Hugging Face model or tokenizer directory "
                                 f"(tokenizer.json, as save_pretrained writes it)")
        try:
            self.path = self._tokenizer_file(where)
            if self.path.stat().st_size > MAX_TOKENIZER_BYTES:
                raise TokenizerError(f"{where}: {self.path} is larger than {MAX_TOKENIZER_BYTES} bytes: not a tokenizer")
            try:
                self.data = self.path.read_bytes()
            except OSError as err:
                raise TokenizerError(f"{where}: {self.path} cannot be read ({err})") from err
            config = self._config("tokenizer_config.json")
            self.specials = self._specials(where, config, self._config("special_tokens_map.json"))
        except ContainmentError as err:
            raise TokenizerError(str(err)) from err

    def _tokenizer_file(self, where: str) -> Path:
        for name in (HF_TOKENIZER_FILE, TOKENIZER_FILE):
            path = self.directory / name
            if path.exists() or path.is_symlink():
                return regular_file(path, f"{where}: the tokenizer", "replace it with a regular file (links are not "
                                    "followed; a Hub cache's snapshot holds links: save_pretrained a copy)")
        slow = [n for n in ("vocab.json", "merges.txt") if (self.directory / n).exists()]
        raise TokenizerError(
            f"{where} holds no tokenizer.json (nor a SentencePiece tokenizer.model)"
            + (f"; {' and '.join(slow)} alone are a slow tokenizer: write its fast form with "
               f"AutoTokenizer.from_pretrained(dir).save_pretrained(dir) where you trust it" if slow else "")
        )

    def _config(self, name: str) -> dict:
        path = self.directory / name
        return _read_json(path, f"data.tokenizer.hf: {name}") if path.exists() or path.is_symlink() else {}

    @property
    def file_name(self) -> str:
        return self.path.name

    def tokenizer(self) -> TextTokenizer:
        return tokenizer_from_bytes(self.file_name, self.data, self.specials)

    def identity(self) -> str:
        """The tokenizer file's and its conventions' sha256: what names data sets tokenized with it."""
        digest = hashlib.sha256(self.data)
        digest.update(json.dumps(asdict(self.specials), sort_keys=True).encode())
        return digest.hexdigest()

    def _specials(self, where: str, config: dict, special_map: dict) -> Specials:
        if self.path.name == HF_TOKENIZER_FILE:
            from tokenizers import Tokenizer

            try:
                tok = plain_tokenizer(Tokenizer.from_str(self.data.decode("utf-8")))
            except Exception as err:  # tokenizers raises its own Exception for a malformed file
                raise TokenizerError(f"{where}: {self.path} is not a tokenizers file ({err})") from err
            to_id = tok.token_to_id
            size = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        else:
            from data_prep.tokenizer import load_tokenizer

            sp = load_tokenizer(self.path)
            pieces = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
            to_id, size = pieces.get, sp.get_piece_size()
        # The model's ids, where the tokenizer's files name no token: config.json's over generation_config.json's.
        model_config = {**self._config("generation_config.json"), **self._config("config.json")}

        def special(key: str) -> int:
            for source, values in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
                text = _token_text(values.get(f"{key}_token"))
                if text is not None:
                    token = to_id(text)
                    if token is None:
                        raise TokenizerError(f"{where}: {source} names {key}_token {text!r}, which the tokenizer's "
                                             f"vocabulary lacks")
                    return token
            value = model_config.get(f"{key}_token_id")
            value = value[0] if isinstance(value, list) and value else value
            if value is None or (isinstance(value, int) and not isinstance(value, bool) and value < 0):
                return -1
            if not isinstance(value, int) or isinstance(value, bool) or value >= size:
                raise TokenizerError(f"{where}: config.json names {key}_token_id {value!r}, not an id of the "
                                     f"tokenizer's {size} ids")
            return value

        eos, bos = special("eos"), special("bos")
        if eos < 0:
            raise TokenizerError(f"{where} names no EOS token (eos_token in tokenizer_config.json, or eos_token_id in "
                                 f"config.json): documents could not be separated; add one")
        add_bos = config.get("add_bos_token")
        if self.path.name == HF_TOKENIZER_FILE:
            # As transformers 5 reads a tokenizer.json: its post-processor decides, whatever add_bos_token says.
            prefix = _post_processor_prefix(tok)
            if isinstance(add_bos, bool) and add_bos != (bos >= 0 and prefix[:1] == (bos,)):
                log.warning("%s: tokenizer_config.json sets add_bos_token=%s but the tokenizer.json's post-processor "
                            "starts a text with %s: following the post-processor, as transformers does", where,
                            add_bos, list(prefix) or "nothing")
        else:
            if add_bos is True and bos < 0:
                raise TokenizerError(f"{where}: tokenizer_config.json sets add_bos_token but names no bos_token")
            prefix = (bos,) if add_bos is True else ()
        return Specials(bos_id=bos, eos_id=eos, pad_id=special("pad"), unk_id=special("unk"), prefix=prefix)


def _post_processor_prefix(tok) -> tuple[int, ...]:
    """The ids the tokenizer's post-processor puts before a text (encode with and without special tokens, on the
    first probe the tokenizer gives ids for)."""
    for probe in ("a", "Hello world", "0", "."):
        plain = tok.encode(probe, add_special_tokens=False).ids
        if not plain:
            continue
        full = tok.encode(probe, add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start: start + len(plain)] == plain:
                return tuple(full[:start])
        return ()
    return ()
