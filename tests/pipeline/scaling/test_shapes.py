"""The shape rule maps parameter counts to model shapes; the grids spend the budgets they name."""

from __future__ import annotations

import math

import pytest

from pipeline.config import ModelConfig, validate_model
from pipeline.scaling.shapes import (
    TINY_SHAPE,
    approx_parameters,
    isoflop_grid,
    nd_grid,
    non_embedding_parameters,
    shape_for_params,
    shape_from_width,
)


def test_parameter_count_is_twelve_layer_d_squared_plus_embeddings():
    assert non_embedding_parameters(96, 12288) == 12 * 96 * 12288**2
    assert approx_parameters(2, 64, vocab_size=1000) == 12 * 2 * 64**2 + 1000 * 64
    assert approx_parameters(2, 64, vocab_size=1000, tie_embeddings=False) == 12 * 2 * 64**2 + 2 * 1000 * 64
    assert approx_parameters(2, 64, d_ff=100) == 2 * (4 * 64**2 + 2 * 64 * 100)


def test_gpt3_175b_shape_comes_out_of_the_rule():
    shape = shape_for_params(175e9, vocab_size=50257)  # defaults: aspect ratio 128, heads of 128
    assert shape == {"n_layer": 96, "d_model": 12288, "n_head": 96, "d_ff": 49152}


@pytest.mark.parametrize("target", [3e5, 1e6, 3e7, 1e9, 7e10])
def test_shape_for_params_is_the_nearest_shape_of_the_rule(target):
    rule = TINY_SHAPE if target < 1e7 else {"aspect_ratio": 64, "head_dim": 64}
    shape = shape_for_params(target, **rule)
    assert shape == shape_from_width(shape["d_model"], **rule)
    assert shape["d_model"] == shape["n_head"] * rule["head_dim"]
    count = approx_parameters(shape["n_layer"], shape["d_model"])
    # No neighbouring width of the rule comes closer to the target (in log space).
    for neighbour in (shape["d_model"] - rule["head_dim"], shape["d_model"] + rule["head_dim"]):
        if neighbour > 0:
            s = shape_from_width(neighbour, **rule)
            assert abs(math.log(count / target)) <= abs(math.log(approx_parameters(s["n_layer"], neighbour) / target))
    validate_model(ModelConfig(**shape, vocab_size=1024))  # a buildable model config


def test_shape_rule_rejects_widths_off_the_head_size():
    with pytest.raises(ValueError, match="multiple of head_dim=16"):
        shape_from_width(40, 32, 16)


def test_isoflop_grid_spends_each_budget_around_the_chinchilla_ratio():
    budgets = [1e12, 1e13, 1e14]
    runs = isoflop_grid(budgets, sizes_per_budget=5, vocab_size=1024, batch_tokens=1024, **TINY_SHAPE)
    for C in budgets:
        row = [r for r in runs if r["budget_flops"] == C]
        assert len({r["N"] for r in row}) >= 4  # distinct sizes, enough for a parabola
        for r in row:
            assert r["C"] == 6 * r["N"] * r["tokens"]
            assert r["tokens"] % 1024 == 0 and r["D"] == r["tokens"]
            assert r["C"] == pytest.approx(C, rel=0.25)  # whole batches; tiny runs round coarsely
            assert r["N"] == approx_parameters(r["model"]["n_layer"], r["model"]["d_model"], vocab_size=1024)
            assert r["N_nonembedding"] < r["N"]
        sizes = sorted(r["N"] for r in row)
        centre = math.sqrt(C / 120)  # D = 20 N
        assert sizes[0] < centre < sizes[-1]
        assert sizes[-1] / sizes[0] > 10  # about 1.5 decades
    # Larger budgets train larger models.
    medians = [sorted(r["N"] for r in runs if r["budget_flops"] == C)[2] for C in budgets]
    assert medians == sorted(medians)


def test_nd_grid_is_every_size_times_every_token_count():
    runs = nd_grid([1e6, 1e7], [1e8, 1e9, 1e10], **TINY_SHAPE)
    assert len(runs) == 6
    assert {r["tokens"] for r in runs} == {10**8, 10**9, 10**10}
    assert len({r["N"] for r in runs}) == 2
    assert all(r["budget_flops"] is None and r["C"] == 6 * r["N"] * r["D"] for r in runs)
