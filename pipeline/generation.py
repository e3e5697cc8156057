"""Sampling: predict -> sample -> append, with a key-value cache so each new token costs one position."""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (to -inf) all but the top_k logits, then all outside the smallest set whose probability >= top_p."""
    logits = logits.clone()
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


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
    """New token ids after the prompt (stopping after EOS). temperature 0 is greedy.

    Prompts longer than the context keep their last context_length tokens. With the cache, when the
    sequence fills the context, the cache is rebuilt from the last half-context of tokens (a sliding
    window), so generation can go on past the context length in both modes.
    """
    context = model.cfg.context_length
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu")
    if seed is not None:
        generator.manual_seed(seed)
    tokens = list(prompt_ids)[-context:] or [eos_id if eos_id is not None else 0]
    new: list[int] = []
    cache, cached_len = None, 0
    for _ in range(max_new_tokens):
        if use_cache:
            if cache is None or cached_len >= context:
                window = tokens[-(context // 2):] if cached_len >= context else tokens[-context:]
                cache = model.new_kv_cache()
                logits, _ = model(torch.tensor([window], device=device), kv_cache=cache, start_pos=0)
                cached_len = len(window)
            else:
                logits, _ = model(torch.tensor([tokens[-1:]], device=device), kv_cache=cache, start_pos=cached_len)
                cached_len += 1
        else:
            window = tokens[-context:]
            logits, _ = model(torch.tensor([window], device=device))
        next_logits = logits[0, -1].float().cpu()
        if temperature == 0:
            token = int(next_logits.argmax())
        else:
            probs = filter_logits(next_logits / temperature, top_k, top_p).softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        tokens.append(token)
        new.append(token)
        if eos_id is not None and token == eos_id:
            break
    return new
