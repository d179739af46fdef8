"""One module matcher with PEFT's own rules: checked against PEFT's functions, name by name."""

from __future__ import annotations

import pytest
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from pipelines.spec import is_target, pattern_key, pattern_value, target_matches

NAMES = [
    f"model.layers.{i}.{block}.{lin}"
    for i in (0, 1, 3, 12)
    for block, lins in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("up_proj", "down_proj")))
    for lin in lins
]
PATTERNS = [
    ["q_proj"],
    [r"model\.layers\.1\..*"],
    [r"layers\.1\..*"],
    [r"layers\.3\.self_attn\.q_proj", "q_proj"],
    [r"mlp\..*", r"model\.layers\.12\..*"],
    [r".*\.1\..*"],
    ["proj"],
]


@pytest.mark.parametrize("patterns", PATTERNS, ids=[",".join(p) for p in PATTERNS])
def test_pattern_key_is_peft_get_pattern_key(patterns):
    for name in NAMES:
        ours = pattern_key(patterns, name)
        assert (ours if ours is not None else name) == get_pattern_key(patterns, name), name


def test_layer_1_does_not_match_layer_12():
    plan = {r"model\.layers\.1\..*": 8}
    assert pattern_value(plan, "model.layers.1.mlp.up_proj", 4) == 8
    assert pattern_value(plan, "model.layers.12.mlp.up_proj", 4) == 4


TARGETS = [
    ["q_proj", "v_proj"],
    ["self_attn.q_proj"],
    r"model\.layers\.(0|3)\..*\.(q_proj|up_proj)",
    r".*proj",
    ["proj"],
]


@pytest.mark.parametrize("target", TARGETS, ids=[str(t) for t in TARGETS])
def test_is_target_is_peft_check_target_module_exists(target):
    config = LoraConfig(target_modules=target)
    for name in NAMES:
        assert is_target(target, name) == bool(check_target_module_exists(config, name)), name


def test_target_matches_counts_each_entry_and_all_linear_spares_the_output_layer():
    assert target_matches(["q_proj", "gate_proj"], NAMES) == {"q_proj": 4, "gate_proj": 0}
    assert target_matches("all-linear", NAMES) == {}
    assert is_target("all-linear", "model.layers.0.mlp.up_proj") and not is_target("all-linear", "lm_head")
