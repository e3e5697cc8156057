"""data.tokenizer.hf: prepare tokenizes with a Hugging Face checkpoint's own tokenizer (built here with tokenizers and
transformers, no downloads), with its BOS/EOS conventions: every document is what transformers' AutoTokenizer gives
for it, then EOS; the same bytes whatever the workers and engine; uint32 shards where the vocabulary needs them;
what such a directory must not be is refused naming the file."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hf_tokenizers import gpt2_style, llama3_style, sentencepiece_style

from data_prep.dataset_dirs import tokenizer_vocab_size
from data_prep.hf_tokenizer import HFTokenizerSource
from data_prep.inspect import describe
from data_prep.mixture import read_documents
from data_prep.partition_work import is_validation
from data_prep.prepare import dataset_dir, prepare
from data_prep.shards import SPLITS, WindowDataset, load_manifest
from data_prep.text_tokenizer import data_tokenizer
from data_prep.tokenizer import TokenizerError
from pipeline.config import ConfigError, DataConfig, TokenizerConfig, validate_data

WINDOW = 33
STYLES = {"gpt2": gpt2_style, "llama3": llama3_style, "sentencepiece": sentencepiece_style}


def hf_config(corpus, out, tokenizer_dir, **kw) -> DataConfig:
    base = dict(name="hf", source="text", path=str(corpus), context_length=WINDOW - 1, val_fraction=0.1,
                output_dir=str(out), tokenizer=TokenizerConfig(hf=str(tokenizer_dir)), num_workers=2,
                shard_tokens=WINDOW * 50, block_bytes=3000)
    return DataConfig(**{**base, **kw})


def transformers_stream(tokenizer_dir: Path, docs: list[str], eos: int) -> list[int]:
    """The documents as transformers' own tokenizer encodes them (its special tokens added), each then EOS."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [t for doc in docs for t in [*hf(doc)["input_ids"], eos]]


def split_stream(out: Path, split: str) -> list[int]:
    ds = WindowDataset(out, split)
    return ds.windows(np.arange(len(ds))).reshape(-1).tolist()


@pytest.mark.parametrize("style", sorted(STYLES))
def test_documents_are_what_transformers_encodes_then_eos(corpus, tmp_path, ray_local, style):
    tokenizer_dir = STYLES[style](tmp_path / style)
    cfg = hf_config(corpus, tmp_path / "out", tokenizer_dir)
    out = prepare(cfg)
    manifest = load_manifest(out)
    source = HFTokenizerSource(tokenizer_dir)
    expected_file = "tokenizer.model" if style == "sentencepiece" else "tokenizer.json"
    assert manifest.tokenizer_file == expected_file and (out / expected_file).read_bytes() == source.data
    assert manifest.eos_id == source.specials.eos_id and manifest.dtype == "<u2"
    assert manifest.document_prefix == {"gpt2": [], "llama3": [source.specials.bos_id],
                                        "sentencepiece": [1]}[style]
    docs, _ = read_documents(cfg)
    for split in SPLITS:
        mine = [d for d in docs if is_validation(d, cfg.val_fraction) == (split == "validation")]
        expected = transformers_stream(tokenizer_dir, mine, manifest.eos_id)
        stream = split_stream(out, split)
        assert len(stream) > 0 and stream == expected[: len(stream)], split
        assert manifest.stats["tokens"][split] == len(expected)
    # What reads a data set reads this one: its tokenizer, bits per byte's byte counts, the inspect command.
    tokenizer = data_tokenizer(manifest)
    ids = tokenizer.encode(docs[0][:2000])
    # The bytes of the text the ids stand for (SentencePiece's normalizer changes whitespace; its dummy prefix
    # is a space that decoding drops).
    assert tokenizer.byte_lengths()[ids].sum() == len(tokenizer.decode(ids).encode()) + (style == "sentencepiece")
    assert "most frequent" in describe(out)


def test_the_same_bytes_whatever_the_workers_and_engine(corpus, tmp_path, ray_local):
    tokenizer_dir = llama3_style(tmp_path / "tok")
    outs = []
    for i, (workers, engine) in enumerate([(1, "actors"), (2, "ray_data")]):
        cfg = hf_config(corpus, tmp_path / f"out{i}", tokenizer_dir, num_workers=workers, tokenize_engine=engine,
                        partition_bytes=6000)
        outs.append(prepare(cfg))
    files = [{p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()} for out in outs]
    assert files[0] == files[1] and len(files[0]) > 6


def test_a_vocabulary_past_65535_gets_uint32_shards(corpus, tmp_path, ray_local):
    tokenizer_dir = gpt2_style(tmp_path / "big", extra_tokens=70_000)
    cfg = hf_config(corpus, tmp_path / "out", tokenizer_dir)
    assert tokenizer_vocab_size(cfg) == 70_601  # what plan and params count with before the data set exists
    manifest = load_manifest(prepare(cfg))
    assert manifest.dtype == "<u4" and manifest.vocab_size == 70_601 and manifest.eos_id == 70_600
    stream = split_stream(manifest.root, "train")
    assert stream.count(70_600) > 1  # EOS, past uint16, stored whole
    docs, _ = read_documents(cfg)
    train = [d for d in docs if not is_validation(d, cfg.val_fraction)]
    assert stream == transformers_stream(tokenizer_dir, train, 70_600)[: len(stream)]


def test_the_data_set_is_named_by_the_tokenizers_content_not_its_path(corpus, tmp_path):
    first = gpt2_style(tmp_path / "a")
    copy = tmp_path / "b"
    copy.mkdir()
    for f in first.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    name = lambda d: dataset_dir(hf_config(corpus, tmp_path / "out", d))  # noqa: E731
    assert name(first) == name(copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "Ġthe"}))  # another EOS
    assert name(first) != name(copy)


def test_what_a_tokenizer_directory_must_not_be_is_refused(corpus, tmp_path):
    good = gpt2_style(tmp_path / "good")
    cfg = hf_config(corpus, tmp_path / "out", good)
    with pytest.raises(ConfigError, match="both name a tokenizer"):
        validate_data(dataclasses.replace(cfg, tokenizer=TokenizerConfig(hf=str(good), model_path=str(good))))
    with pytest.raises(ConfigError, match="is not a directory"):
        validate_data(dataclasses.replace(cfg, tokenizer=TokenizerConfig(hf=str(tmp_path / "missing"))))

    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "vocab.json").write_text("{}")
    (slow / "merges.txt").write_text("")
    with pytest.raises(TokenizerError, match=r"vocab.json and merges.txt alone are a slow tokenizer"):
        HFTokenizerSource(slow)

    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(good / "tokenizer.json", linked / "tokenizer.json")  # as a Hub cache's snapshot holds it
    with pytest.raises(TokenizerError, match="is a symbolic link"):
        HFTokenizerSource(linked)

    config = json.loads((good / "tokenizer_config.json").read_text())
    (good / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|not in the vocabulary|>"}))
    with pytest.raises(TokenizerError, match="names eos_token '<|not in the vocabulary|>', which the tokenizer's"):
        HFTokenizerSource(good)
    (good / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                            if k not in ("eos_token", "bos_token")}))
    with pytest.raises(TokenizerError, match="names no EOS token"):
        HFTokenizerSource(good)
    (good / "tokenizer_config.json").write_text(json.dumps(config))
    (good / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nothing"}}')
    with pytest.raises(TokenizerError, match="is not a tokenizers file"):
        HFTokenizerSource(good)


def test_text_is_text_whatever_the_tokenizer_json_carries(tmp_path):
    """A tokenizer.json saved with truncation and padding on encodes whole documents unpadded; text that spells a
    special token stays text (only the document's own prefix and EOS are special ids); a special id from
    config.json must be one of the tokenizer's."""
    from tokenizers import Tokenizer

    directory = gpt2_style(tmp_path / "tok")
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.enable_truncation(5)
    tok.enable_padding(length=8, pad_id=0)
    tok.save(str(directory / "tokenizer.json"))
    tokenizer = HFTokenizerSource(directory).tokenizer()
    text = "the king is dead, long live the king<|endoftext|>and the queen"
    ids = tokenizer.encode_batch([text, "hi"])
    assert len(ids[0]) > 8 and len(ids[1]) == 2 and tokenizer.specials.eos_id not in ids[0].tolist()
    assert tokenizer.decode(ids[0].tolist()) == text

    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                                 if k not in ("eos_token", "bos_token")}))
    (directory / "config.json").write_text(json.dumps({"eos_token_id": 70_000}))
    with pytest.raises(TokenizerError, match="config.json names eos_token_id 70000, not an id of the tokenizer's"):
        HFTokenizerSource(directory)


def test_a_checkpoints_sentencepiece_model_exports_with_its_own_conventions(tmp_path):
    """Llama 2's layout (tokenizer.model, add_bos_token): the export's tokenizer encodes as the checkpoint's own
    and as prepare did (BOS first), with no token added to the vocabulary."""
    from transformers import AutoTokenizer

    from pipeline.evaluation.export import hf_tokenizer

    directory = sentencepiece_style(tmp_path / "sp")
    source = HFTokenizerSource(directory)
    hf_tokenizer(directory / "tokenizer.model", source.specials).save_pretrained(tmp_path / "export")
    exported, original = (AutoTokenizer.from_pretrained(d) for d in (tmp_path / "export", directory))
    text = "Hello world, my lord.\nAnd more"
    tokenizer = source.tokenizer()
    assert exported(text)["input_ids"] == original(text)["input_ids"] == [*source.specials.prefix,
                                                                         *tokenizer.encode(text)]
    assert len(exported) == tokenizer.vocab_size
