"""Sampling: predict -> sample -> append, with a key-value cache so each new token costs one position.

The context window: a prompt longer than model.context_length keeps its last context_length tokens. Once the
cache holds context_length positions it cannot take another (the model was trained on positions
0 .. context_length-1), so each further token re-encodes the last context_length tokens from position 0, just
as generation without the cache does. The two modes thus give the same tokens at any length (a test checks
it); past the context the cache no longer saves work.
"""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """A copy of logits (..., vocab) with -inf outside the top_k largest (0: no top-k), then outside the
    smallest set of the most probable tokens whose probabilities sum to at least top_p (1.0: no top-p)."""
    logits = logits.clone()
    if 0 < top_k < logits.shape[-1]:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, torch.topk(logits, top_k, dim=-1).indices, True)
        logits[~keep] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the more probable tokens before it already reach top_p (the first always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


def check_sampling(temperature: float, top_p: float) -> None:
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy).")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1].")


def sampling_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with seed, or with a non-deterministic seed (a fresh one starts from a fixed one)."""
    generator = torch.Generator(device="cpu")
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    return generator


def sample_token(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator
) -> int:
    """One token id from a (vocab,) row of logits; temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return int(logits.argmax())
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> list[int]:
    """The new token ids after the prompt, at most max_new_tokens, ending with eos_id if it was sampled.

    Sampling divides the logits by temperature, then keeps the top_k, then the top_p nucleus. With a seed
    the draws come from a CPU torch.Generator, so the same seed gives the same tokens on any device. An
    empty prompt starts from eos_id (documents follow an EOS in the packed training data). The model runs
    in eval mode (no dropout) and is put back in its previous mode afterwards.
    """
    check_sampling(temperature, top_p)
    tokens = list(prompt_ids)
    if not tokens:
        if eos_id is None:
            raise ValueError("the prompt is empty and eos_id is None: give at least one prompt token.")
        tokens = [eos_id]
    context = model.cfg.context_length
    device = next(model.parameters()).device
    generator = sampling_generator(seed)
    was_training = model.training
    model.eval()
    try:
        new: list[int] = []
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = model(torch.tensor([tokens[-context:]], device=device))
            elif cache is None or cache[0].length >= context:
                # First step, or the cache is full: encode the last window from position 0.
                cache = model.new_kv_cache()
                logits, _ = model(torch.tensor([tokens[-context:]], device=device), kv_cache=cache)
            else:
                start = cache[0].length
                logits, _ = model(torch.tensor([tokens[-1:]], device=device), kv_cache=cache, start_pos=start)
            token = sample_token(logits[0, -1].float().cpu(), temperature, top_k, top_p, generator)
            tokens.append(token)
            new.append(token)
            if token == eos_id:
                break
        return new
    finally:
        model.train(was_training)


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  generator: torch.Generator) -> torch.Tensor:
    """One token id per row of (B, vocab) logits; temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate_batch(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    seed: int | None = None,
) -> list[list[list[int]]]:
    """num_samples continuations of each prompt, sampled together: out[p][s] holds the new ids of sample s of
    prompt p, at most max_new_tokens, ending with eos_id if it was sampled.

    Prompts of the same length share one batch (num_samples rows each) and one preallocated key-value cache;
    each step feeds one token per row. A row that sampled EOS stops growing (its further draws are discarded);
    the batch stops when every row did or after max_new_tokens. The context window is handled as in
    generate(). With a seed the draws come from one CPU generator for the whole call: the same call gives the
    same tokens on any device.
    """
    check_sampling(temperature, top_p)
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1.")
    starts = []
    for prompt in prompts:
        if not prompt and eos_id is None:
            raise ValueError("a prompt is empty and eos_id is None: give at least one prompt token.")
        starts.append(list(prompt) or [eos_id])
    context = model.cfg.context_length
    device = next(model.parameters()).device
    generator = sampling_generator(seed)
    out: list[list[list[int]]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for index, tokens in enumerate(starts):
        by_length.setdefault(len(tokens), []).append(index)
    was_training = model.training
    model.eval()
    try:
        for length in sorted(by_length):
            group = by_length[length]
            rows = torch.tensor([starts[i] for i in group for _ in range(num_samples)], device=device)
            new = _sample_rows(model, rows, max_new_tokens, context, temperature, top_k, top_p, eos_id, generator)
            for k, index in enumerate(group):
                out[index] = new[k * num_samples : (k + 1) * num_samples]
        return out
    finally:
        model.train(was_training)


def _sample_rows(model, rows: torch.Tensor, max_new_tokens: int, context: int, temperature: float, top_k: int,
                 top_p: float, eos_id: int | None, generator: torch.Generator) -> list[list[int]]:
    """New ids of each row of equally long prompts (B, T), sampled in one batch."""
    batch = rows.shape[0]
    new = torch.empty(batch, 0, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    tokens, cache = rows, None
    for _ in range(max_new_tokens):
        if cache is None or cache[0].length >= context:
            cache = model.new_kv_cache()  # first step, or the cache is full: encode the last window from 0
            logits, _ = model(tokens[:, -context:], kv_cache=cache)
        else:
            logits, _ = model(tokens[:, -1:], kv_cache=cache, start_pos=cache[0].length)
        drawn = sample_tokens(logits[:, -1].float().cpu(), temperature, top_k, top_p, generator)
        new = torch.cat([new, drawn[:, None]], dim=1)
        tokens = torch.cat([tokens, drawn[:, None].to(tokens.device)], dim=1)
        if eos_id is not None:
            done |= drawn == eos_id
            if bool(done.all()):
                break
    result = []
    for row in new.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        result.append(row)
    return result
