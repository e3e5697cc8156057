"""Small Hugging Face tokenizers built here with `tokenizers` and transformers themselves (no downloads), each saved
as save_pretrained writes a published checkpoint's: the conventions of GPT-2 (byte-level BPE, <|endoftext|> as BOS and
EOS, no BOS added), Llama 3 (byte-level BPE, a post-processor that puts <|begin_of_text|> first, <|end_of_text|> as
EOS) and Llama 2 (a SentencePiece model, add_bos_token)."""

from __future__ import annotations

from pathlib import Path

from data_prep.sources import shakespeare_documents


def shakespeare_sample(n_docs: int = 12) -> list[str]:
    docs = []
    for doc in shakespeare_documents():
        docs.append(doc)
        if len(docs) == n_docs:
            return docs
    return docs


def byte_level_bpe(vocab_size: int, specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(shakespeare_sample(), trainer)
    return tok


def gpt2_style(directory: Path, vocab_size: int = 600, extra_tokens: int = 0) -> Path:
    """GPT-2's conventions; with extra_tokens, that many added tokens after the vocabulary (ids past 65,535 need
    uint32 shards) and <|endoftext|> moved to the last id."""
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_bpe(vocab_size, [] if extra_tokens else ["<|endoftext|>"])
    if extra_tokens:
        tok.add_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
        tok.add_special_tokens(["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            clean_up_tokenization_spaces=False).save_pretrained(directory)
    return Path(directory)


def llama3_style(directory: Path, vocab_size: int = 600) -> Path:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_bpe(vocab_size, ["<|begin_of_text|>", "<|end_of_text|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                            clean_up_tokenization_spaces=False).save_pretrained(directory)
    return Path(directory)


def sentencepiece_style(directory: Path, vocab_size: int = 400) -> Path:
    """Llama 2's layout: tokenizer.model only, its tokenizer_config.json adding BOS."""
    import json

    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(line for d in shakespeare_sample() for line in d.split("\n") if line),
                                   model_prefix=str(directory / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
                                   byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    (directory / "tokenizer.vocab").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return directory
