"""SentencePiece: train on a sample of the corpus, or load an existing model.

Trained models keep text as it is: identity normalisation, no whitespace collapsing, no dummy prefix, and
"\n" as a whole piece, so decode(encode(text)) == text for ordinary text, line breaks and indentation
included. Special ids are fixed: unk=0, bos=1, eos=2, pad=3. Training is seeded, hence deterministic.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from data_prep.encoding import cut_points
from pipeline.config import PipelineError, TokenizerConfig

log = logging.getLogger(__name__)

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
_SPECIAL_PIECES = 4
_BYTE_PIECES = 256
# SentencePiece skips longer training sentences; longer lines are cut (training_sentences).
_MAX_SENTENCE_BYTES = 16_384


class TokenizerError(PipelineError, ValueError):
    """A tokenizer that cannot be trained or used as configured."""


def minimum_vocab_size(tok: TokenizerConfig) -> int:
    """Pieces every model needs before learning any merge: specials, user symbols, and bytes with byte_fallback."""
    return _SPECIAL_PIECES + len(tok.user_defined_symbols) + (_BYTE_PIECES if tok.byte_fallback else 0)


def training_sentences(documents: Iterable[str]) -> Iterator[str]:
    """The lines of the documents (SentencePiece learns from sentences; "\n" is a user-defined piece), as a
    stream: SentencePiece keeps only its sample (input_sentence_size) of them in memory. A line too long for
    SentencePiece's trainer, which would skip it, is cut before spaces into several sentences."""
    longest = _MAX_SENTENCE_BYTES // 4  # characters that surely fit, at up to 4 UTF-8 bytes each
    for doc in documents:
        for line in doc.split("\n"):
            if not line.strip():
                continue
            if len(line) <= longest:
                yield line
                continue
            bounds = [0, *cut_points(line, longest), len(line)]
            yield from (p for a, b in zip(bounds, bounds[1:], strict=False) if (p := line[a:b]).strip())


def train_tokenizer(documents: Iterable[str], tok: TokenizerConfig, out_path: Path, seed: int) -> Path:
    """Train a SentencePiece model on the lines of `documents` (SentencePiece samples tok.sample_sentences of
    them itself) and write it to out_path."""
    return _train(training_sentences(documents), tok, out_path, seed, tok.sample_sentences, shuffle=True)


def train_tokenizer_on_sample(sentences: Iterable[str], tok: TokenizerConfig, out_path: Path, seed: int) -> Path:
    """Train on exactly these sentences, in this order (a sample drawn by prepare: SentencePiece's own input
    sampling ignores the seed, so it is switched off) and write the model to out_path."""
    return _train(iter(sentences), tok, out_path, seed, 0, shuffle=False)


def _train(sentences: Iterator[str], tok: TokenizerConfig, out_path: Path, seed: int, input_sentence_size: int,
           shuffle: bool) -> Path:
    first = next(sentences, None)
    if first is None:
        raise TokenizerError("no text to train the tokenizer on: the corpus (training split) is empty")
    count = 1

    def stream() -> Iterator[str]:
        nonlocal count
        yield first
        for sentence in sentences:
            count += 1
            yield sentence

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=stream(),
            model_writer=model,
            model_type=str(tok.type),
            vocab_size=tok.vocab_size,
            byte_fallback=tok.byte_fallback,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=shuffle,
            # With byte fallback, rare characters become bytes; without it every character needs a piece.
            character_coverage=0.9995 if tok.byte_fallback else 1.0,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            user_defined_symbols=list(tok.user_defined_symbols),
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            # A fixed thread count: the trained model must not depend on the machine.
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise _explain_training_error(str(err), tok, count) from err
    out_path = Path(out_path)
    out_path.write_bytes(model.getvalue())
    return out_path


def _explain_training_error(message: str, tok: TokenizerConfig, n_lines: int) -> TokenizerError:
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return TokenizerError(
            f"data.tokenizer.vocab_size={tok.vocab_size} is too large for this corpus ({n_lines} lines of "
            f"training text support at most {too_high.group(2)} pieces): lower data.tokenizer.vocab_size to "
            f"{too_high.group(2)} or less, or add text"
        )
    too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_low:
        return TokenizerError(
            f"data.tokenizer.vocab_size={tok.vocab_size} is too small: the special pieces and the corpus's "
            f"characters alone need {too_low.group(2)}: raise data.tokenizer.vocab_size to at least "
            f"{too_low.group(2)}"
            + ("" if tok.byte_fallback else " (or set data.tokenizer.byte_fallback=true)")
        )
    return TokenizerError(f"SentencePiece training failed: {message.strip()}")


def copy_tokenizer(model_path: str | Path, out_path: Path) -> Path:
    """Check an existing model (it must know EOS) and copy it to out_path."""
    sp = load_tokenizer(model_path)
    if sp.eos_id() < 0:
        raise TokenizerError(
            f"data.tokenizer.model_path={model_path} has no EOS piece, so documents cannot be separated: "
            f"use a model trained with eos_id set (or leave model_path unset to train one)"
        )
    shutil.copyfile(model_path, out_path)
    return out_path


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"no tokenizer at {path}: point to an existing SentencePiece .model file")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as err:
        raise TokenizerError(f"{path} is not a readable SentencePiece model: {err}") from err
    return sp


def round_trip_failures(sp, texts: Iterable[str]) -> list[str]:
    """The texts that decode(encode(text)) does not give back exactly (sp: a SentencePieceProcessor or a
    data_prep.text_tokenizer.TextTokenizer)."""
    return [t for t in texts if sp.decode(sp.encode(t)) != t]


def check_round_trip(sp, texts: list[str], source: str) -> None:
    """Warn when the tokenizer changes text (e.g. a loaded model that normalises, or no byte fallback)."""
    bad = round_trip_failures(sp, texts)
    if not bad:
        log.info("tokenizer round trip: decode(encode(text)) == text for %d sample documents", len(texts))
        return
    sample = bad[0]
    back = sp.decode(sp.encode(sample))
    where = next((i for i, (a, b) in enumerate(zip(sample, back, strict=False)) if a != b), min(len(sample), len(back)))
    log.warning(
        "tokenizer %s does not round-trip %d of %d sample documents (first difference at character %d: "
        "%r became %r); the model will not see the text exactly as written",
        source, len(bad), len(texts), where, sample[max(0, where - 20): where + 20], back[max(0, where - 20): where + 20],
    )
