"""The one tokenizer interface every stage uses, over the two kinds a data set can hold (its manifest names the file):

    tokenizer.model  SentencePiece: trained by prepare, given as data.tokenizer.model_path, or the one a Hugging
                     Face checkpoint ships where it has no tokenizer.json
    tokenizer.json   a Hugging Face `tokenizers` fast tokenizer (data.tokenizer.hf: GPT-2, Llama 3, Qwen, ...
                     byte-level BPE, vocabularies above 65,535), read as JSON: nothing in it runs code

What the file alone does not say is kept beside it (in the manifest): the special ids and the ids every document
starts with (`Specials`; a BOS where the checkpoint's convention adds one, none for prepare's own tokenizer). Every
document is its prefix, its text's tokens (no special tokens added by the tokenizer), then EOS.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from data_prep.shards import TOKENIZER_FILE

HF_TOKENIZER_FILE = "tokenizer.json"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass(frozen=True)
class Specials:
    """A tokenizer's special ids (-1 where it has none) and the ids each document starts with."""

    bos_id: int
    eos_id: int
    pad_id: int = -1
    unk_id: int = -1
    prefix: tuple[int, ...] = field(default_factory=tuple)


class TextTokenizer(ABC):
    """What prepare, training, evaluation and export ask of a tokenizer (see the module docstring)."""

    file_name: str  # its file in a data set
    data: bytes  # that file's bytes (what workers rebuild it from)
    specials: Specials
    vocab_size: int  # ids are below this
    cut_documents: bool  # whether long documents may be encoded in pieces cut before a space (data_prep.encoding)

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """The ids of each text (no special tokens), as int32 arrays."""
        ...

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """The text of ids, special tokens left out."""
        ...

    @abstractmethod
    def piece(self, token: int) -> str:
        """The vocabulary entry of an id, as the tokenizer writes it."""
        ...

    @abstractmethod
    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (a byte piece one, special tokens none): bits per byte's denominator."""
        ...


class SentencePieceTokenizer(TextTokenizer):
    file_name = TOKENIZER_FILE

    def __init__(self, data: bytes, specials: Specials | None = None):
        import sentencepiece as spm

        from data_prep.encoding import can_cut_documents

        self.data = data
        self.sp = spm.SentencePieceProcessor(model_proto=data)
        self.specials = specials or Specials(self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id(), self.sp.unk_id())
        self.vocab_size = self.sp.get_piece_size()
        self.cut_documents = can_cut_documents(data)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return self.sp.encode(texts, return_type="numpy")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def piece(self, token: int) -> str:
        return self.sp.id_to_piece(token)

    def byte_lengths(self) -> np.ndarray:
        sp = self.sp
        lengths = np.zeros(sp.get_piece_size(), dtype=np.int64)
        for i in range(sp.get_piece_size()):
            if sp.is_control(i) or sp.is_unknown(i):
                continue
            lengths[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode())
        return lengths


class HFTokenizer(TextTokenizer):
    file_name = HF_TOKENIZER_FILE
    cut_documents = False  # pre-tokenizers differ (Metaspace adds a prefix space per piece): documents encode whole

    def __init__(self, data: bytes, specials: Specials):
        from tokenizers import Tokenizer

        self.data, self.specials = data, specials
        self.tok = plain_tokenizer(Tokenizer.from_str(data.decode("utf-8")))
        # Text that spells a special token ("<|endoftext|>" in a web page) is text: only the document's own prefix
        # and EOS are special ids (SentencePiece reads such text as text too).
        self.tok.encode_special_tokens = True
        self.vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def piece(self, token: int) -> str:
        return self.tok.id_to_token(token) or ""

    def byte_lengths(self) -> np.ndarray:
        """Per id: a byte-level token's characters each stand for one byte (GPT-2's alphabet); a byte-fallback
        piece <0xNN> is one byte; a SentencePiece-style piece is its text with ▁ as a space; special tokens none."""
        kinds = _decoder_kinds(json.loads(self.data).get("decoder") or {})  # read here alone: the file parsed once
        alphabet = _byte_alphabet() if "ByteLevel" in kinds else set()
        special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for piece, i in self.tok.get_vocab(with_added_tokens=True).items():
            if piece in special:
                continue
            if alphabet and all(c in alphabet for c in piece):
                lengths[i] = len(piece)
            elif "ByteFallback" in kinds and _BYTE_PIECE.fullmatch(piece):
                lengths[i] = 1
            else:
                lengths[i] = len(piece.replace("\u2581", " ").encode())
        return lengths


def _decoder_kinds(decoder: dict) -> set[str]:
    kinds = {decoder.get("type", "")}
    for inner in decoder.get("decoders") or []:
        if isinstance(inner, dict):
            kinds |= _decoder_kinds(inner)
    return kinds


@lru_cache(maxsize=1)
def _byte_alphabet() -> set[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return set(ByteLevel.alphabet())


def plain_tokenizer(tok):
    """A `tokenizers` Tokenizer without the truncation and padding a saved tokenizer.json may carry (they would cut
    every document to their length and pad it)."""
    tok.no_truncation()
    tok.no_padding()
    return tok


def tokenizer_from_bytes(file_name: str, data: bytes, specials: Specials | None = None) -> TextTokenizer:
    """The tokenizer a data set holds as `file_name` (see the module docstring)."""
    if file_name == HF_TOKENIZER_FILE:
        if specials is None:
            raise ValueError("a tokenizer.json needs its special ids (the manifest's)")
        return HFTokenizer(data, specials)
    return SentencePieceTokenizer(data, specials)


def open_tokenizer(path: Path, specials: Specials | None = None) -> TextTokenizer:
    """The tokenizer file at path (a TokenizerError naming it when it is not one)."""
    from data_prep.tokenizer import TokenizerError, load_tokenizer

    path = Path(path)
    if path.name != HF_TOKENIZER_FILE:
        load_tokenizer(path)  # its errors name the file
    try:
        return tokenizer_from_bytes(path.name, path.read_bytes(), specials)
    except (OSError, RuntimeError, ValueError) as err:
        raise TokenizerError(f"{path} is not a readable tokenizer: {err}") from err


def data_tokenizer(info) -> TextTokenizer:
    """The tokenizer of a data set or blend (its manifest or blend record, from load_data_info)."""
    return open_tokenizer(info.tokenizer_path, specials_of(info))


def specials_of(info) -> Specials:
    return Specials(info.bos_id, info.eos_id, info.pad_id, info.unk_id, tuple(info.document_prefix))
