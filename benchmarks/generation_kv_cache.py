"""New tokens/s of greedy generation with the key-value cache versus re-encoding the whole prefix, at a
512-token prompt, in one run (same model, same tokens: the outputs are checked to be identical).

    python -m benchmarks.generation_kv_cache --prefix 512 --new 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline.config import ModelConfig
from pipeline.model.generation import generate
from pipeline.model.gpt import GPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prefix", type=int, default=512)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=4096, context_length=args.prefix + args.new, n_layer=args.layers,
                      n_head=args.d_model // 64, d_model=args.d_model)
    model = GPT(cfg).eval()
    prompt = torch.randint(0, 4096, (args.prefix,)).tolist()
    results = {}
    outputs = {}
    for use_cache in (True, False):
        generate(model, prompt, 2, temperature=0, use_cache=use_cache)  # warm-up
        start = time.perf_counter()
        outputs[use_cache] = generate(model, prompt, args.new, temperature=0, use_cache=use_cache)
        results["with_cache" if use_cache else "without_cache"] = args.new / (time.perf_counter() - start)
    identical = outputs[True] == outputs[False]
    print(json.dumps({
        "prefix_tokens": args.prefix, "new_tokens": args.new,
        "new_tokens_per_s_with_cache": round(results["with_cache"], 1),
        "new_tokens_per_s_without_cache": round(results["without_cache"], 1),
        "speedup": round(results["with_cache"] / results["without_cache"], 2),
        "identical_tokens": identical,
    }, indent=2))
    if not identical:
        raise SystemExit("the cache changed the greedy tokens")


if __name__ == "__main__":
    main()
