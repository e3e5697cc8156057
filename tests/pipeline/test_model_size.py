"""Parameter counts against published figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config import ModelConfig, validate_model
from pipeline.model_size import count_parameters

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"


def load_model(name: str) -> ModelConfig:
    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / f"{name}.yaml"))
    return OmegaConf.to_object(node)


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_model_config_is_valid_and_named_after_its_file(path):
    cfg = load_model(path.stem)
    validate_model(cfg)
    assert cfg.name == path.stem


def test_gpt3_175b_matches_the_design_figures():
    p = count_parameters(load_model("gpt3_175b"))
    assert p.embedding == 617_558_016
    assert p.unembedding == 617_558_016
    assert p.attention_qkvo_each == 14_495_514_624
    assert p.mlp_matrices_each == 57_982_058_496
    assert p.n_mlp_matrices == 2
    assert p.weight_matrices == 175_181_291_520
    # Reported separately: learned positions, biases (4d + d_ff + d per layer), LayerNorm weights and biases.
    assert p.positional == 2048 * 12288
    assert p.biases == 96 * (4 * 12288 + 49152 + 12288)
    assert p.norms == (2 * 96 + 1) * 2 * 12288


def test_gpt2_small_has_124m_parameters():
    assert count_parameters(load_model("gpt2_small")).total == 124_439_808


@pytest.mark.parametrize("name,billions", [("gpt3_125m", 0.125), ("gpt3_350m", 0.35), ("gpt3_760m", 0.76),
                                           ("gpt3_1_3b", 1.3), ("gpt3_2_7b", 2.7), ("gpt3_6_7b", 6.7),
                                           ("gpt3_13b", 13.0), ("gpt3_175b", 175.0)])
def test_gpt3_family_sizes_match_the_paper(name, billions):
    """Table 2.1's sizes count one embedding matrix besides the transformer's matrices (within 3%)."""
    p = count_parameters(load_model(name))
    assert p.weight_matrices - p.unembedding == pytest.approx(billions * 1e9, rel=0.03)


def test_params_command_prints_the_breakdown():
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "params", "model=gpt3_175b"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "175,181,291,520" in proc.stdout
    assert "14,495,514,624" in proc.stdout and "57,982,058,496" in proc.stdout
    assert "biases" in proc.stdout and "positional" in proc.stdout
