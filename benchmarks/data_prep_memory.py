"""Prepare at scale: throughput, memory and the tokenizer sample, at two corpus sizes, in one run.

The corpus is generated text nobody tuned for: documents of Shakespeare's lines drawn with Zipfian frequencies
(a few lines repeat very often, most rarely), boilerplate lines ("All rights reserved.") repeated across
documents, and fresh word salad, as jsonl files of about 128 MB. Each size is prepared as a user runs it:
`data_prep.prepare.prepare` with data.num_workers=2, the engine `auto` picks (data.tokenize_engine) and the
tokenizer trained by prepare on its sample (the default; --given-tokenizer hands it a model trained beforehand),
on a Ray started in this process. Reported per size:

- memory: the machine's used memory (total less available, what the OOM killer sees: Ray's shared-memory object
  store counts) above the idle machine, sampled every 100 ms through the prepare; beside it the summed resident
  set of this process and its descendants, and the driver's own;
- phases from the pipeline's log: the tokenizer sample pass, the tokenizer's training, the tokenize phase (first
  to last partition), the whole prepare (reading to manifest);
- raw encode, right after the prepare, with the tokenizer it made: `SentencePieceProcessor.encode` in 2 processes
  (each its half of the first half of the files, read and JSON-parsed outside the clock, encoded in batches of
  8 MB; only encode is timed), returning int32 arrays as the pipeline asks; the whole prepare's tokens/s over it;
- with --quality (the first size by default): tokens per byte of 20,000 held-out lines (from the generator with
  another seed) under three tokenizers trained with the pipeline's options (`train_tokenizer_on_sample`, the
  same trainer and normalizer settings) on samples of the same size: the pipeline's own (its data set's
  tokenizer), one on a uniform random sample of line occurrences of the whole training split (random keys, a
  reservoir), and one on the sample the pipeline drew before (the lines of smallest text hash, every repeat of a
  line in or out together).

Targets (issue 35): whole prepare >= 0.8 of raw encode at 1 and 2 GiB; peak machine memory above idle < 3 GiB
at both and flat (2 GiB <= 1.25 x 1 GiB); the pipeline's tokens per byte within 0.5% of the uniform sample's.

    python -m benchmarks.data_prep_memory                       # 1 and 2 GiB: about 15 minutes on 2 cores
    python -m benchmarks.data_prep_memory --engine actors       # the engine forced
    python -m benchmarks.data_prep_memory --small 0.05 --large 0.2 --quality 0.05
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil

FILE_BYTES = 128 << 20
BATCH_BYTES = 8 << 20
HELD_OUT_LINES = 20_000
BOILERPLATE = ["Subscribe to our newsletter for the latest updates.", "All rights reserved.", "Click here to read more.",
               "Share this article on social media.", "Posted by admin", "Related posts:", "Leave a comment",
               "Terms of use | Privacy policy | Contact", "Copyright 2024 The Globe Players Ltd.", "Advertisement",
               "Read the full story below.", "This page was last edited on Tuesday."]


class LineSource:
    """Lines as the corpus holds them: 8% boilerplate (Zipf over 12 lines), 72% Shakespeare's distinct lines
    (Zipf, exponent 1.15, over a seeded order of the 115k), 20% fresh word salad (4-14 words, Zipf over the plays'
    words)."""

    def __init__(self, seed: int):
        from collections import Counter

        import numpy as np

        from data_prep.mixture import read_documents
        from pipeline.config import DataConfig

        docs = read_documents(DataConfig())[0]
        self.lines = sorted({line.strip() for d in docs for line in d.split("\n") if line.strip()})
        random.Random(1).shuffle(self.lines)
        counts = Counter(w.strip(".,;:!?'\"").lower() for line in self.lines for w in line.split())
        self.words = [w for w, _ in counts.most_common() if w]
        self.rng = np.random.default_rng(seed)

    def draw(self, n: int) -> list[str]:
        rng = self.rng
        kind, line, boiler = rng.random(n), rng.zipf(1.15, n) - 1, rng.zipf(1.5, n) - 1
        lengths = rng.integers(4, 15, n)
        words, at, out = rng.zipf(1.2, int(lengths.sum())) - 1, 0, []
        for i in range(n):
            if kind[i] < 0.08:
                out.append(BOILERPLATE[boiler[i] % len(BOILERPLATE)])
            elif kind[i] < 0.8:
                out.append(self.lines[line[i] % len(self.lines)])
            else:
                out.append(" ".join(self.words[j % len(self.words)] for j in words[at:at + lengths[i]]).capitalize() + ".")
            at += lengths[i]
        return out


def build_corpus(root: Path, gib: float, seed: int = 0) -> int:
    """jsonl files of generated documents (LineSource; about 30 lines each), about FILE_BYTES each, gib GiB in all;
    returns the bytes written."""
    source = LineSource(seed)
    root.mkdir(parents=True, exist_ok=True)
    target, written, index = int(gib * 2**30), 0, 0
    while written < target:
        size = 0
        with open(root / f"part-{index:04d}.jsonl", "w") as out:
            while size < FILE_BYTES and written + size < target:
                lines = source.draw(400_000)
                cuts = [int(c) for c in source.rng.geometric(1 / 30, len(lines) // 15).cumsum() if c < len(lines)]
                chunk = "".join(json.dumps({"text": "\n".join(lines[a:b])}) + "\n"
                                for a, b in zip([0, *cuts], [*cuts, len(lines)], strict=True) if a < b)
                out.write(chunk)
                size += len(chunk.encode())
        written += size
        index += 1
    return written


class TreeMemory:
    """Peaks, sampled every 100 ms: the machine's used memory (total less available) and the summed resident set
    of this process and its descendants, and this process's own."""

    def __init__(self, idle: int):
        self.peak = self.driver_peak = self.machine_peak = 0
        self.idle = idle  # the machine's used memory before Ray started
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            self.driver_peak = max(self.driver_peak, me.memory_info().rss)
            self.machine_peak = max(self.machine_peak, _machine_used())
            self._stop.wait(0.1)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _machine_used() -> int:
    vm = psutil.virtual_memory()
    return vm.total - vm.available


class PhaseLog(logging.Handler):
    """The pipeline's own phase lines: the sample pass and training times it logs, and the times of its
    'tokenizing ...' and last 'prepared N of N partitions' lines."""

    def __init__(self):
        super().__init__()
        self.start = self.end = None
        self.sample_s = self.train_s = None
        self.sample_size = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("tokenizing "):
            self.start = record.created
        if match := re.match(r"drew a tokenizer sample of (\d+) .* in ([\d.]+)s", message):
            self.sample_size, self.sample_s = int(match.group(1)), float(match.group(2))
        if match := re.match(r"trained a .* in ([\d.]+)s", message):
            self.train_s = float(match.group(1))
        match = re.match(r"prepared (\d+) of (\d+) partitions", message)
        if match and match.group(1) == match.group(2):
            self.end = record.created


def raw_encode(files: list[str], model: str, return_type, queue) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    seconds, tokens, batch, size = 0.0, 0, [], 0

    def flush():
        nonlocal seconds, tokens
        start = time.perf_counter()
        tokens += sum(len(ids) + 1 for ids in sp.encode(batch, return_type=return_type))  # + one EOS each
        seconds += time.perf_counter() - start

    for file in files:
        with open(file) as f:
            for line in f:
                batch.append(json.loads(line)["text"])
                size += len(batch[-1])
                if size >= BATCH_BYTES:
                    flush()
                    batch, size = [], 0
    if batch:
        flush()
    queue.put((tokens, seconds))


def raw_baseline(corpus: Path, model: str, workers: int, return_type=int) -> float:
    """Tokens/s of raw encode in `workers` processes, each its share of the first half of the files (wall: the
    slowest)."""
    files = sorted(str(p) for p in corpus.glob("*.jsonl"))
    files = files[: max(workers, len(files) // 2)]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=raw_encode, args=(files[i::workers], model, return_type, queue))
             for i in range(workers)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(t for t, _ in results) / max(s for _, s in results)


def prepare_once(corpus: Path, out: Path, model: str | None, workers: int, engine: str,
                 idle: int) -> tuple[dict, Path]:
    from data_prep.prepare import prepare
    from data_prep.shards import load_manifest
    from pipeline.config import DataConfig, TokenizerConfig

    data = DataConfig(name="bench", source="jsonl", path=str(corpus), num_workers=workers, output_dir=str(out),
                      tokenizer=TokenizerConfig(model_path=model) if model else TokenizerConfig(vocab_size=8192),
                      tokenize_engine=engine)
    phases = PhaseLog()
    logging.getLogger("data_prep.prepare").addHandler(phases)
    start = time.time()
    with TreeMemory(idle) as memory:
        directory = prepare(data)
    wall = time.time() - start
    logging.getLogger("data_prep.prepare").removeHandler(phases)
    manifest = load_manifest(directory)
    tokens = sum(manifest.stats["tokens"].values())
    return {"input_gib": round(sum(p.stat().st_size for p in corpus.glob("*.jsonl")) / 2**30, 3),
            "partitions": manifest.stats["partitions"],
            "peak_machine_above_idle_gib": round((memory.machine_peak - memory.idle) / 2**30, 3),
            "peak_rss_all_gib": round(memory.peak / 2**30, 3),
            "peak_rss_driver_gib": round(memory.driver_peak / 2**30, 3), "wall_s": round(wall, 1),
            "phases_s": {"tokenizer_sample": phases.sample_s, "tokenizer_training": phases.train_s,
                         "tokenize": round(phases.end - phases.start, 1) if phases.end else None},
            "tokenizer_sample_lines": phases.sample_size,
            "tokens": tokens, "tokens_per_s": round(tokens / wall),
            "tokenize_phase_tokens_per_s": round(tokens / (phases.end - phases.start)) if phases.end else None,
            }, directory


def training_lines(corpus: Path, val_fraction: float):
    """The training split's sentences, as prepare's tokenizer sample sees them (its split and line rules)."""
    from data_prep.partition_work import is_validation
    from data_prep.tokenizer import training_sentences

    for file in sorted(corpus.glob("*.jsonl")):
        with open(file) as f:
            for line in f:
                doc = json.loads(line)["text"]
                if not is_validation(doc, val_fraction):
                    yield from training_sentences([doc])


def reference_samples(corpus: Path, k: int, seed: int = 99) -> dict[str, list[str]]:
    """Two samples of k training sentences of the whole corpus, in one pass: `uniform`, line occurrences of
    smallest random key (a reservoir: every occurrence equally likely), and `text_hash`, the lines of smallest
    text hash (the pipeline's sample before: every repeat of a line in or out together)."""
    import heapq

    import numpy as np

    from data_prep.partition_work import hash_fraction
    from pipeline.config import DataConfig

    rng = np.random.default_rng(seed)
    uniform_keys, uniform_lines, hashed, chunk = np.zeros(0), [], [], []

    def flush() -> None:
        nonlocal uniform_keys, uniform_lines
        keys = np.concatenate([uniform_keys, rng.random(len(chunk))])
        lines = uniform_lines + chunk
        if len(lines) > k:
            keep = np.argpartition(keys, k - 1)[:k]
            keys, lines = keys[keep], [lines[i] for i in keep.tolist()]
        uniform_keys, uniform_lines = keys, lines
        chunk.clear()

    for line in training_lines(corpus, DataConfig().val_fraction):
        chunk.append(line)
        h = -hash_fraction(line, b"tokenizer-before:")
        if len(hashed) < k:
            heapq.heappush(hashed, (h, line))
        elif h > hashed[0][0]:
            heapq.heapreplace(hashed, (h, line))
        if len(chunk) >= 4 * k:
            flush()
    flush()
    order = np.argsort(uniform_keys)
    return {"uniform": [uniform_lines[i] for i in order.tolist()], "text_hash": [s for _, s in sorted(hashed, reverse=True)]}


def tokenizer_quality(corpus: Path, data_dir: Path, k: int, tmp: Path) -> dict:
    """Tokens per byte of held-out lines under the pipeline's tokenizer and under the same options trained on a
    uniform sample of k occurrences and on the text-hash sample of k lines."""
    import sentencepiece as spm

    from data_prep.tokenizer import train_tokenizer_on_sample
    from pipeline.config import TokenizerConfig

    held_out = LineSource(seed=12345).draw(HELD_OUT_LINES)
    held_bytes = sum(len(line.encode()) for line in held_out)
    models = {"pipeline": str(data_dir / "tokenizer.model")}
    start = time.time()
    samples = reference_samples(corpus, k)
    for name, sample in samples.items():
        models[name] = str(tmp / f"{name}.model")
        train_tokenizer_on_sample(sample, TokenizerConfig(vocab_size=8192), Path(models[name]), seed=0)
    result = {name: round(sum(len(ids) for ids in spm.SentencePieceProcessor(model_file=m).encode(held_out))
                          / held_bytes, 5) for name, m in models.items()}
    return {"tokens_per_byte": result, "sample_lines": k, "held_out_lines": HELD_OUT_LINES,
            "pipeline_over_uniform": round(result["pipeline"] / result["uniform"], 4),
            "text_hash_over_uniform": round(result["text_hash"] / result["uniform"], 4),
            "seconds": round(time.time() - start, 1)}


def main() -> None:
    import ray

    from data_prep.mixture import read_documents
    from data_prep.tokenizer import train_tokenizer
    from pipeline.config import DataConfig, TokenizerConfig

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=float, default=1.0, help="GiB")
    parser.add_argument("--large", type=float, default=2.0, help="GiB (0: the first size alone)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--engine", default="auto", choices=["actors", "ray_data", "auto"],
                        help="data.tokenize_engine (auto: what a user gets)")
    parser.add_argument("--given-tokenizer", action="store_true",
                        help="hand prepare a BPE 8k trained on the plays beforehand instead of training its own")
    parser.add_argument("--quality", type=float, nargs="*", default=None,
                        help="sizes (GiB) at which to compare the tokenizer with reference samples (default: the "
                             "first size; none with --given-tokenizer)")
    args = parser.parse_args()
    quality = args.quality if args.quality is not None else ([] if args.given_tokenizer else [args.small])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        model = None
        if args.given_tokenizer:
            model = str(tmp / "bpe.model")
            train_tokenizer(read_documents(DataConfig())[0], TokenizerConfig(vocab_size=8192), Path(model), 1234)
        report = {"workers": args.workers, "engine": args.engine, "tokenizer": "given" if model else "trained",
                  "sizes": []}
        for gib in [size for size in (args.small, args.large) if size > 0]:
            corpus = tmp / f"corpus-{gib}"
            build_corpus(corpus, gib)
            idle = _machine_used()
            ray.init(num_cpus=args.workers, include_dashboard=False, configure_logging=False, log_to_driver=False)
            try:
                result, directory = prepare_once(corpus, tmp / f"out-{gib}", model, args.workers, args.engine, idle)
            finally:
                ray.shutdown()
            tokenizer = str(directory / "tokenizer.model")
            raw = raw_baseline(corpus, tokenizer, args.workers, "numpy")
            result["raw_encode_tokens_per_s"] = round(raw)
            result["prepare_over_raw"] = round(result["tokens_per_s"] / raw, 3)
            if result["tokenize_phase_tokens_per_s"]:
                result["tokenize_phase_over_raw"] = round(result["tokenize_phase_tokens_per_s"] / raw, 3)
            if gib in quality:
                result["tokenizer_quality"] = tokenizer_quality(corpus, directory, result["tokenizer_sample_lines"],
                                                                tmp)
            report["sizes"].append(result)
            print(json.dumps(result), flush=True)
            shutil.rmtree(corpus)
            shutil.rmtree(tmp / f"out-{gib}")
        if len(report["sizes"]) == 2:
            small, large = report["sizes"]
            report["peak_large_over_small"] = round(large["peak_machine_above_idle_gib"]
                                                    / small["peak_machine_above_idle_gib"], 3)
        report["targets"] = {"prepare_over_raw": ">= 0.8", "peak_machine_above_idle_gib": "< 3",
                             "peak_large_over_small": "<= 1.25", "pipeline_over_uniform": "within 0.995-1.005"}
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
