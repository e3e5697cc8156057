"""Data-prep throughput: the prepare stage's tokens/s beside raw encode with the same tokenizer, text and cores.

The corpus is Shakespeare's scenes repeated until it holds at least --mb MB, written as jsonl files. A BPE
tokenizer is trained once on one copy of the plays (not timed) and handed to prepare: with --tokenizer
sentencepiece (the default) a SentencePiece model through data.tokenizer.model_path; with --tokenizer hf a
byte-level BPE `tokenizers` fast tokenizer saved as a Hugging Face directory (GPT-2's conventions) through
data.tokenizer.hf. Measurements on the same documents:

- raw, 1 process: `SentencePieceProcessor.encode(documents)` (or `tokenizers.Tokenizer.encode_batch_fast`, one
  thread: TOKENIZERS_PARALLELISM=false, as in the pipeline's actors) in this process;
- raw, N processes: the documents in N contiguous ranges of equal size, each encoded by a process forked
  before Ray starts, with the model loaded before the clock starts (pure encode on the same N cores; nothing
  is read or written);
- raw, N processes, pipeline's pieces: the same, on the pieces the pipeline encodes (documents longer than
  data_prep.encoding._SEGMENT_CHARS cut before a space: the same tokens, and SentencePiece is faster on
  shorter inputs), the stricter baseline;
- pipeline: `data_prep.prepare.prepare` with data.num_workers=N on a Ray started beforehand (the start of
  its tokenizer actors included): reading the jsonl files, the split by hash, tokenization in the actor pool,
  packing, shard writing with sha256 and fsync, the manifest; once with Ray Data driving the actors and once
  with the plain actor pool. The report names the one data.tokenize_engine=auto picks for this corpus and
  worker count (Ray Data from data_prep.encoding.RAY_DATA_MIN_CHARS_PER_WORKER characters per actor on): that
  is "the pipeline" of the headline ratio.

Tokens are counted as the pipeline does (one EOS per document). The report gives tokens/s of each and the
pipeline's ratio to each (target: >= 0.7 of raw encode on the same cores). Raw and pipeline runs alternate
and the medians are reported: on a shared 2-core VM single measurements swing.

    python -m benchmarks.data_prep_throughput --mb 50 --workers 2 --repeats 3
    python -m benchmarks.data_prep_throughput --mb 400 --workers 2 --repeats 1   # where auto picks Ray Data
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

# What the raw encoders read: inherited by the forked processes, never sent to them.
_TEXTS: dict[str, list[str]] = {"documents": [], "pieces": []}
_ENCODE = None


def build_corpus(root: Path, mb: float) -> tuple[list[str], int]:
    """(scenes, copies): the plays' scenes, repeated until they hold >= mb MB of UTF-8, one jsonl file per copy."""
    from data_prep.mixture import read_documents
    from pipeline.config import DataConfig

    scenes, _ = read_documents(DataConfig())
    copy_bytes = sum(len(s.encode()) for s in scenes)
    copies = int(np.ceil(mb * 1e6 / copy_bytes))
    root.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": s}) + "\n" for s in scenes)
    for i in range(copies):
        (root / f"plays_{i:03d}.jsonl").write_text(lines)
    return scenes, copies


def _load_model(model_path: str) -> None:
    """The raw encoder of the model (a SentencePiece .model, or a Hugging Face directory's tokenizer.json)."""
    global _ENCODE
    if model_path.endswith(".model"):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=model_path)
        _ENCODE = lambda texts: sp.encode(texts, num_threads=1)  # noqa: E731
    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))
        _ENCODE = lambda texts: [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]  # noqa: E731


def _encode_range(job: tuple[str, int, int]) -> int:
    """Tokens of _TEXTS[kind][first:stop] (no EOS)."""
    kind, first, stop = job
    return sum(len(ids) for ids in _ENCODE(_TEXTS[kind][first:stop]))


def hf_tokenizer_dir(scenes: list[str], vocab: int, directory: Path) -> Path:
    """A byte-level BPE of `vocab` ids trained on the scenes, saved as a checkpoint's tokenizer (GPT-2's
    conventions: <|endoftext|> ends each document)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(scenes, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(directory)
    return directory


def raw_single(model_path: str) -> tuple[int, float]:
    _load_model(model_path)
    start = time.perf_counter()
    tokens = _encode_range(("documents", 0, len(_TEXTS["documents"])))
    return tokens + len(_TEXTS["documents"]), time.perf_counter() - start


def start_raw_pool(model_path: str, processes: int):
    """Forked processes that inherit the texts and load the model before any clock starts. Forked before Ray
    starts, so that they inherit none of its threads."""
    pool = multiprocessing.get_context("fork").Pool(processes, initializer=_load_model, initargs=(model_path,))
    pool.map(_encode_range, [("documents", 0, 1)] * processes, chunksize=1)
    return pool


def raw_parallel(pool, processes: int, kind: str) -> tuple[int, float]:
    """_TEXTS[kind] in `processes` contiguous ranges of equal characters, one per process."""
    texts = _TEXTS[kind]
    total = sum(len(t) for t in texts)
    cuts, size = [0], 0
    for i, text in enumerate(texts):
        size += len(text)
        if size >= total * len(cuts) / processes and len(cuts) < processes:
            cuts.append(i + 1)
    cuts.append(len(texts))
    start = time.perf_counter()
    tokens = sum(pool.map(_encode_range, [(kind, a, b) for a, b in zip(cuts, cuts[1:], strict=False)], chunksize=1))
    return tokens + len(_TEXTS["documents"]), time.perf_counter() - start


def pipeline(cfg) -> tuple[int, float]:
    from data_prep.prepare import dataset_dir, prepare
    from data_prep.shards import load_manifest

    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    start = time.perf_counter()
    out = prepare(cfg)
    seconds = time.perf_counter() - start
    assert out == dataset_dir(cfg)
    return sum(load_manifest(out).stats["tokens"].values()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MB (the plays repeated)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", choices=("sentencepiece", "hf"), default="sentencepiece",
                        help="a SentencePiece model (data.tokenizer.model_path) or a Hugging Face tokenizer.json "
                             "(data.tokenizer.hf)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from data_prep.encoding import can_cut_documents, make_segments, tokenize_engine
    from data_prep.tokenizer import load_tokenizer, train_tokenizer
    from pipeline.config import DataConfig, TokenizerConfig

    n = args.workers
    labels = {"raw_1": "raw encode, 1 process", f"raw_{n}": f"raw encode, {n} processes",
              f"raw_{n}_pieces": f"raw encode, {n} proc., same pieces",
              "pipeline_ray_data": f"pipeline, {n} workers, Ray Data", "pipeline_actors": f"pipeline, {n} workers, plain actors"}
    results: dict[str, list[tuple[int, float]]] = {key: [] for key in labels}
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        scenes, copies = build_corpus(root / "corpus", args.mb)
        _TEXTS["documents"] = scenes * copies
        corpus_mb = sum(len(d.encode()) for d in _TEXTS["documents"]) / 1e6
        if args.tokenizer == "hf":
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process, as in the pipeline's actors
            model = hf_tokenizer_dir(scenes, args.vocab, root / "hf")
            tokenizer_cfg, cut = TokenizerConfig(hf=str(model)), False
        else:
            model = train_tokenizer(scenes, TokenizerConfig(vocab_size=args.vocab), root / "bpe.model", seed=0)
            tokenizer_cfg = TokenizerConfig(model_path=str(model))
            cut = can_cut_documents(load_tokenizer(model).serialized_model_proto())
        _TEXTS["pieces"] = make_segments(_TEXTS["documents"], cut).texts
        raw_pool = start_raw_pool(str(model), n)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=n, include_dashboard=False, configure_logging=False, log_to_driver=False)
        cfg = DataConfig(name="bench", source="jsonl", path=str(root / "corpus"), context_length=1024,
                         val_fraction=0.005, num_workers=n, output_dir=str(root / "out"),
                         tokenizer=tokenizer_cfg)
        for _ in range(args.repeats):
            results["raw_1"].append(raw_single(str(model)))
            results[f"raw_{n}"].append(raw_parallel(raw_pool, n, "documents"))
            results[f"raw_{n}_pieces"].append(raw_parallel(raw_pool, n, "pieces"))
            results["pipeline_ray_data"].append(pipeline(dataclasses.replace(cfg, tokenize_engine="ray_data")))
            results["pipeline_actors"].append(pipeline(dataclasses.replace(cfg, tokenize_engine="actors")))
        raw_pool.close()
        raw_pool.join()
        ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rates = {k: float(np.median([t / s for t, s in v])) for k, v in results.items()}
    tokens = {k: v[0][0] for k, v in results.items()}
    auto = tokenize_engine("auto", sum(len(d) for d in _TEXTS["documents"]), n)
    rates["pipeline"] = rates[f"pipeline_{auto}"]
    print(f"corpus: {corpus_mb:.1f} MB, {len(_TEXTS['documents'])} documents ({len(_TEXTS['pieces'])} pieces), "
          f"BPE {args.vocab} ({args.tokenizer}); {n} workers, {os.cpu_count()} cores; median of {args.repeats}; "
          f"data.tokenize_engine=auto picks {auto}")
    print(f"{'measurement':<36}{'tokens':>12}{'seconds':>10}{'tokens/s':>14}{'it / raw ' + str(n):>15}")
    for key, label in labels.items():
        seconds = float(np.median([s for _, s in results[key]]))
        ratio = rates[key] / rates[f"raw_{n}"]
        print(f"{label:<36}{tokens[key]:>12,}{seconds:>10.2f}{rates[key]:>14,.0f}{ratio:>15.3f}")
    print(f"pipeline ({auto}, what auto runs) / raw encode on {n} processes: "
          f"{rates['pipeline'] / rates[f'raw_{n}']:.3f} (target 0.7)")
    print(json.dumps({
        "corpus_mb": round(corpus_mb, 1),
        "documents": len(_TEXTS["documents"]),
        "vocab_size": args.vocab,
        "tokenizer": args.tokenizer,
        "workers": n,
        **{f"{key}_tokens_per_s": [round(t / s) for t, s in runs] for key, runs in results.items()},
        "pipeline_ray_data_seconds": [round(s, 2) for _, s in results["pipeline_ray_data"]],
        "pipeline_actors_seconds": [round(s, 2) for _, s in results["pipeline_actors"]],
        "auto_engine": auto,
        f"ratio_pipeline_ray_data_over_raw_{n}": round(rates["pipeline_ray_data"] / rates[f"raw_{n}"], 3),
        f"ratio_pipeline_actors_over_raw_{n}": round(rates["pipeline_actors"] / rates[f"raw_{n}"], 3),
        "ratio_pipeline_over_raw_1": round(rates["pipeline"] / rates["raw_1"], 3),
        f"ratio_pipeline_over_raw_{n}": round(rates["pipeline"] / rates[f"raw_{n}"], 3),
        f"ratio_pipeline_over_raw_{n}_pieces": round(rates["pipeline"] / rates[f"raw_{n}_pieces"], 3),
        "target_ratio_over_raw_same_cores": 0.7,
        "same_token_count": len(set(tokens.values())) == 1,
    }, indent=2))
    if len(set(tokens.values())) != 1:
        raise SystemExit(f"the measurements counted different tokens ({tokens}): the ratios compare unlike work")


if __name__ == "__main__":
    main()
