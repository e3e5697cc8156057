"""SentencePiece: train on a sample of the corpus, or load an existing model."""

from __future__ import annotations

import io
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from pipeline.config import TokenizerConfig

log = logging.getLogger(__name__)

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


class TokenizerError(ValueError):
    pass


def train_tokenizer(documents: Iterable[str], tok: TokenizerConfig, out_path: Path, seed: int) -> Path:
    """Train a SentencePiece model on the lines of `documents`; write it to out_path."""
    lines = [line for doc in documents for line in doc.split("\n") if line.strip()]
    if not lines:
        raise TokenizerError("no text to train the tokenizer on: the corpus is empty")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type=tok.type,
            vocab_size=tok.vocab_size,
            byte_fallback=tok.byte_fallback,
            input_sentence_size=tok.sample_sentences,
            shuffle_input_sentence=True,
            character_coverage=0.9995 if tok.byte_fallback else 1.0,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            user_defined_symbols=list(tok.user_defined_symbols),
            # Keep text as it is (identity normalisation, no whitespace collapsing) so decode(encode(x)) == x.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as err:
        message = str(err)
        if "Vocabulary size" in message or "vocab_size" in message:
            raise TokenizerError(
                f"data.tokenizer.vocab_size={tok.vocab_size} is too large for this corpus ({message.strip()}): "
                f"lower data.tokenizer.vocab_size"
            ) from err
        raise TokenizerError(f"SentencePiece training failed: {message}") from err
    out_path.write_bytes(model.getvalue())
    return out_path


def copy_tokenizer(model_path: str, out_path: Path) -> Path:
    sp = load_tokenizer(model_path)
    if sp.eos_id() < 0:
        raise TokenizerError(f"{model_path} has no EOS token; documents cannot be separated: train one with eos_id set")
    shutil.copyfile(model_path, out_path)
    return out_path


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as err:
        raise TokenizerError(f"{path} is not a readable SentencePiece model: {err}") from err
    return sp
