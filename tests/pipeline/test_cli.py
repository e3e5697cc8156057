"""The command line: free-text prompts survive Hydra's override grammar; overrides are told from prompts."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from pipeline.cli import OVERRIDE, quote_override_value
from pipeline.compose import compose_node


@pytest.mark.parametrize("prompt", [
    "HAMLET:", "x = 1", "it's", "cost ${model.n_layer} here", "back\\slash", "ends with \\", "quote\\'d",
    "two \\\\ before 'quotes'", "unicode: naïve — 中文",
])
def test_a_prompt_composes_back_to_itself(prompt):
    node = compose_node([f"eval.prompt={quote_override_value(prompt)}"])
    assert OmegaConf.to_object(node).eval.prompt == prompt


def test_overrides_are_told_from_prompts():
    for override in ("eval.temperature=0", "+x=1", "model=gpt2_small", "hydra/launcher=submitit_local"):
        assert OVERRIDE.match(override), override
    for prompt in ("HAMLET:", "x = 1", "To be, or not to be", "ROMEO: it's"):
        assert not OVERRIDE.match(prompt), prompt
