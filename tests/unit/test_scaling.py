"""Strategies and batching: the derived DeepSpeed config, overrides, and the global batch. Pure, no Ray."""

from __future__ import annotations

import pytest

from cluster.deepspeed import STRATEGIES, deep_merge, ds_config, offloads, override_problems, zero_stage
from pipelines.data import Sharder
from pipelines.spec import SpecError, validate


def _spec(**sections):
    raw = {"data": {"train": "builtin:json_extract"}}
    raw.update(sections)
    return validate(raw)


def test_ddp_has_no_deepspeed_config():
    assert ds_config("ddp", 8, 1, 2, 1.0, "float32") is None
    assert _spec().deepspeed_config() is None


@pytest.mark.parametrize(
    "strategy,stage", [("zero1", 1), ("zero2", 2), ("zero2_offload", 2), ("zero3", 3), ("zero3_offload", 3)]
)
def test_presets_set_the_stage(strategy, stage):
    assert zero_stage(strategy) == stage
    assert ds_config(strategy, 8, 1, 2, 1.0, "float32")["zero_optimization"]["stage"] == stage


def test_offload_presets():
    assert offloads("zero2") == {"optimizer": False, "params": False}
    assert offloads("zero2_offload") == {"optimizer": True, "params": False}
    assert offloads("zero3_offload") == {"optimizer": True, "params": True}
    assert offloads("zero3", {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}) == {
        "optimizer": True,
        "params": False,
    }


def test_config_is_derived_from_the_spec_once():
    spec = _spec(
        model={"dtype": "bfloat16"},
        train={"micro_batch_size": 4, "global_batch_size": 32, "max_grad_norm": 0.5},
        scaling={
            "num_workers": 2,
            "strategy": "zero2",
            "deepspeed": {"zero_optimization": {"reduce_bucket_size": 1000}},
        },
    )
    cfg = spec.deepspeed_config()
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 4 == spec.grad_accum()
    assert cfg["train_batch_size"] == 32 == spec.global_batch_size()
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 1000  # the override
    assert cfg["zero_optimization"]["stage"] == 2  # the preset survives the merge
    # the spec itself is untouched by deriving
    assert spec.train.grad_accum == 1 and spec.scaling.deepspeed == {"zero_optimization": {"reduce_bucket_size": 1000}}


def test_overrides_cannot_redefine_what_the_spec_defines():
    problems = dict(
        override_problems(
            {
                "gradient_clipping": 2.0,
                "zero_optimization": {"stage": 1, "overlap_comm": True},
                "bf16": {"enabled": True},
            }
        )
    )
    assert set(problems) == {"gradient_clipping", "zero_optimization.stage", "bf16"}
    assert "train.max_grad_norm" in problems["gradient_clipping"] and "2.0" in problems["gradient_clipping"]
    assert override_problems({"zero_optimization": {"overlap_comm": True}}) == []


def test_deep_merge_does_not_mutate():
    base = {"a": {"b": 1, "c": 2}}
    out = deep_merge(base, {"a": {"c": 3}, "d": 4})
    assert out == {"a": {"b": 1, "c": 3}, "d": 4} and base == {"a": {"b": 1, "c": 2}}


def test_every_strategy_validates_with_lora():
    for s in STRATEGIES:
        assert _spec(scaling={"num_workers": 2, "strategy": s}).scaling.strategy == s


def test_galore_with_zero_names_the_working_combination():
    with pytest.raises(SpecError) as e:
        _spec(method={"name": "galore"}, scaling={"num_workers": 2, "strategy": "zero3"})
    ((field, msg),) = e.value.problems
    assert field == "scaling.strategy" and "'zero3'" in msg and "ddp" in msg


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_global_batch_is_the_same_whatever_the_worker_count(workers):
    """With train.global_batch_size, each optimizer step consumes the same examples for any worker count."""
    spec = _spec(train={"micro_batch_size": 2, "global_batch_size": 8}, scaling={"num_workers": workers})
    assert spec.global_batch_size() == 8 and spec.grad_accum() == 8 // (2 * workers)

    def step_examples(step: int, world: int, accum: int) -> list[int]:
        out = []
        for rank in range(world):
            sh = Sharder(100, 2, world, rank, seed=7)
            for micro in range(accum):
                out += sh.indices(step * accum + micro)
        return sorted(out)

    reference = [step_examples(s, 1, 4) for s in range(5)]
    got = [step_examples(s, workers, spec.grad_accum()) for s in range(5)]
    assert got == reference


def test_workers_see_disjoint_shards():
    shards = [set(Sharder(64, 4, 2, r, seed=0).indices(3)) for r in range(2)]
    assert shards[0].isdisjoint(shards[1]) and all(len(s) == 4 for s in shards)
