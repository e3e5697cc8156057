"""The shape rule of a scaling sweep, and the grids of runs it plans.

Shape rule (one knob per axis, as in Kaplan et al. 2020, whose loss depends weakly on shape at fixed N):
    d_model  a multiple of head_dim                          (every head has head_dim channels)
    n_layer  max(1, round(d_model / aspect_ratio))            (a fixed aspect ratio d_model / n_layer)
    n_head   d_model / head_dim
    d_ff     4 d_model                                        (GELU MLP)
For a target parameter count the rule takes the d_model (in steps of head_dim) whose approximate count is
nearest to the target in log space. Defaults fit real models: aspect ratio 128 and heads of 128 give GPT-3
175B's shape exactly (96 layers of 12,288; Kaplan found 64-128 and up about equally good at that scale).
Tiny CPU sweeps use TINY_SHAPE (aspect ratio 32, heads of 16, as conf/sweep/isoflop_tiny.yaml), which keeps
several layers and heads in models of a few hundred thousand parameters.

Parameter counts here are the usual analytic approximation (weight matrices only, no biases or norms):
    non-embedding  n_layer (4 d_model^2 + 2 d_model d_ff)    = 12 n_layer d_model^2 with d_ff = 4 d_model
    embedding      vocab_size d_model, twice when the unembedding is not tied
pipeline.model.size.count_parameters gives exact counts of the built model; sweeps that train use those.
"""

from __future__ import annotations

import math

DEFAULT_ASPECT_RATIO = 128
DEFAULT_HEAD_DIM = 128
TINY_SHAPE = {"aspect_ratio": 32, "head_dim": 16}
CHINCHILLA_TOKENS_PER_PARAM = 20.0  # D_opt / N_opt near Chinchilla's optimum: centre of an IsoFLOP row


def non_embedding_parameters(n_layer: int, d_model: int, d_ff: int | None = None) -> int:
    """Attention (4 d^2) and MLP (2 d d_ff) weight matrices over all layers."""
    d_ff = 4 * d_model if d_ff is None else d_ff
    return n_layer * (4 * d_model * d_model + 2 * d_model * d_ff)


def approx_parameters(n_layer: int, d_model: int, d_ff: int | None = None, vocab_size: int | None = None,
                      tie_embeddings: bool = True) -> int:
    """Non-embedding matrices plus the embedding (and, untied, the unembedding) when vocab_size is given."""
    embedding = 0 if vocab_size is None else vocab_size * d_model * (1 if tie_embeddings else 2)
    return non_embedding_parameters(n_layer, d_model, d_ff) + embedding


def shape_from_width(d_model: int, aspect_ratio: int = DEFAULT_ASPECT_RATIO,
                     head_dim: int = DEFAULT_HEAD_DIM) -> dict[str, int]:
    """ModelConfig fields (n_layer, d_model, n_head, d_ff) of the shape rule at a given width."""
    if d_model <= 0 or d_model % head_dim:
        raise ValueError(f"d_model={d_model} must be a positive multiple of head_dim={head_dim}: "
                         f"use {max(1, round(d_model / head_dim)) * head_dim}")
    return {"n_layer": max(1, round(d_model / aspect_ratio)), "d_model": d_model, "n_head": d_model // head_dim,
            "d_ff": 4 * d_model}


def shape_for_params(n_params: float, aspect_ratio: int = DEFAULT_ASPECT_RATIO, head_dim: int = DEFAULT_HEAD_DIM,
                     vocab_size: int | None = None, tie_embeddings: bool = True) -> dict[str, int]:
    """ModelConfig fields of the shape whose approx_parameters is nearest to n_params (in log space).

    The count counts embeddings when vocab_size is given; a target below the smallest shape (one head,
    one layer) gets the smallest shape."""
    if n_params <= 0:
        raise ValueError(f"n_params={n_params} must be positive")
    if aspect_ratio <= 0 or head_dim <= 0:
        raise ValueError(f"aspect_ratio={aspect_ratio} and head_dim={head_dim} must be positive")

    def count(width: int) -> int:
        s = shape_from_width(width, aspect_ratio, head_dim)
        return approx_parameters(s["n_layer"], width, s["d_ff"], vocab_size, tie_embeddings)

    # Counts grow with width, so walk up from a guess below the answer (12 d^3 / aspect_ratio = N) until
    # the count passes the target, then keep whichever neighbour is nearer.
    guess = (n_params * aspect_ratio / 12) ** (1 / 3)
    width = max(head_dim, head_dim * math.floor(0.5 * guess / head_dim))
    while count(width) < n_params:
        width += head_dim
    below = width - head_dim
    if below >= head_dim and math.log(n_params / count(below)) < math.log(count(width) / n_params):
        width = below
    return shape_from_width(width, aspect_ratio, head_dim)


def _run(shape: dict[str, int], tokens: float, budget_flops: float | None, vocab_size: int | None,
         tie_embeddings: bool, batch_tokens: int | None) -> dict:
    n = approx_parameters(shape["n_layer"], shape["d_model"], shape["d_ff"], vocab_size, tie_embeddings)
    if batch_tokens:
        tokens = batch_tokens * max(1, round(tokens / batch_tokens))  # whole optimiser steps
    tokens = int(round(tokens))
    return {"N": n, "N_nonembedding": non_embedding_parameters(shape["n_layer"], shape["d_model"], shape["d_ff"]),
            "D": float(tokens), "tokens": tokens, "C": 6.0 * n * tokens, "budget_flops": budget_flops,
            "model": dict(shape)}


def isoflop_grid(budgets_flops: list[float], sizes_per_budget: int = 5, *, span_decades: float = 1.5,
                 tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM, aspect_ratio: int = DEFAULT_ASPECT_RATIO,
                 head_dim: int = DEFAULT_HEAD_DIM, vocab_size: int | None = None, tie_embeddings: bool = True,
                 batch_tokens: int | None = None) -> list[dict]:
    """Approach 2's runs: for each budget C, sizes_per_budget model sizes spaced evenly in log N over
    span_decades, centred on the N with D = tokens_per_param * N (N = sqrt(C / (6 tokens_per_param))), each
    trained on D = C / (6 N) tokens (rounded to whole batches of batch_tokens when given).

    Each run: {"N", "N_nonembedding", "D", "tokens", "C" (6 N D as trained), "budget_flops" (the nominal C),
    "model": {n_layer, d_model, n_head, d_ff}}. Sizes that round to the same shape appear once; sorted by
    budget, then N."""
    if sizes_per_budget < 1:
        raise ValueError(f"sizes_per_budget={sizes_per_budget} must be at least 1 (3+ for approach 2)")
    runs = []
    for C in sorted(budgets_flops):
        if C <= 0:
            raise ValueError(f"budget {C} FLOPs must be positive")
        centre = math.sqrt(C / (6 * tokens_per_param))
        offsets = [0.0] if sizes_per_budget == 1 else [
            span_decades * (i / (sizes_per_budget - 1) - 0.5) for i in range(sizes_per_budget)]
        shapes = []
        for offset in offsets:
            shape = shape_for_params(centre * 10**offset, aspect_ratio, head_dim, vocab_size, tie_embeddings)
            if shape not in shapes:
                shapes.append(shape)
        for shape in shapes:
            n = approx_parameters(shape["n_layer"], shape["d_model"], shape["d_ff"], vocab_size, tie_embeddings)
            runs.append(_run(shape, C / (6 * n), C, vocab_size, tie_embeddings, batch_tokens))
    return runs


def nd_grid(sizes_params: list[float], tokens: list[float], *, aspect_ratio: int = DEFAULT_ASPECT_RATIO,
            head_dim: int = DEFAULT_HEAD_DIM, vocab_size: int | None = None, tie_embeddings: bool = True,
            batch_tokens: int | None = None) -> list[dict]:
    """Every model size (target parameter counts, mapped through shape_for_params) trained on every token
    count: runs as in isoflop_grid with budget_flops None, sorted by N, then D."""
    shapes = []
    for n in sizes_params:
        shape = shape_for_params(n, aspect_ratio, head_dim, vocab_size, tie_embeddings)
        if shape not in shapes:
            shapes.append(shape)
    runs = [_run(shape, d, None, vocab_size, tie_embeddings, batch_tokens) for shape in shapes for d in tokens]
    return sorted(runs, key=lambda r: (r["N"], r["D"]))
