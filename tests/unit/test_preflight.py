"""Pre-flight checks on the built model: every method passes; each broken case fails naming the cause."""

from __future__ import annotations

import pytest
import torch

from pipelines.model import load_base, methods
from pipelines.train.preflight import PreflightError, check, module_names, preflight, target_matches
from tests.conftest import tiny_spec
from tests.unit.test_methods import CASES


def _build(tiny_model_dir, chat_data, **method):
    spec = tiny_spec(tiny_model_dir, chat_data, method={"r": 4, **method})
    base, _, _ = load_base(spec)
    names = module_names(base)
    return spec, methods.build(spec, base), names


@pytest.mark.parametrize("name", list(CASES))
def test_every_method_passes_preflight(tiny_model_dir, chat_data, name):
    extra, _ = CASES[name]
    spec, prepared, names = _build(tiny_model_dir, chat_data, name=name, **extra)
    report = check(spec, prepared, names)
    assert report.trainable == sum(p.numel() for p in prepared.model.parameters() if p.requires_grad) > 0
    assert "trainable" in report.summary()


def test_lora_summary_counts_a_and_b(tiny_model_dir, chat_data):
    spec, prepared, names = _build(tiny_model_dir, chat_data, name="lora", target_modules=["q_proj", "v_proj"])
    report = check(spec, prepared, names)
    assert report.matched == {"q_proj": 2, "v_proj": 2}  # 2 layers
    # q_proj 64→64, v_proj 64→32 (2 kv heads of 16): A is r×in, B is out×r
    assert report.by_kind == {"lora_A": 2 * 4 * (64 + 64), "lora_B": 2 * 4 * (64 + 32)}


def test_target_that_matches_nothing_fails_clearly(tiny_model_dir, chat_data):
    # PEFT itself accepts the list as long as *one* entry matches
    spec, prepared, names = _build(tiny_model_dir, chat_data, name="lora", target_modules=["q_proj", "query_key_value"])
    with pytest.raises(PreflightError) as e:
        check(spec, prepared, names)
    msg = str(e.value)
    assert "method.target_modules" in msg and "'query_key_value'" in msg and "q_proj" in msg


def test_unfrozen_base_fails(tiny_model_dir, chat_data):
    spec, prepared, names = _build(tiny_model_dir, chat_data, name="lora")
    leaked = prepared.model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight
    leaked.requires_grad_(True)
    problems = preflight(spec, prepared, names).problems
    assert any("base is not frozen" in p and "up_proj.base_layer.weight" in p for p in problems), problems
    assert any("not in the optimizer" in p for p in problems), problems


def test_frozen_parameter_in_optimizer_fails(tiny_model_dir, chat_data):
    spec, prepared, names = _build(tiny_model_dir, chat_data, name="lora")
    frozen = prepared.model.base_model.model.model.embed_tokens.weight
    prepared.optimizer.add_param_group({"params": [frozen]})
    problems = preflight(spec, prepared, names).problems
    assert any("optimizer holds 1 frozen" in p and "embed_tokens" in p for p in problems), problems


def test_nonzero_lora_b_at_init_fails(tiny_model_dir, chat_data):
    spec, prepared, names = _build(tiny_model_dir, chat_data, name="lora")
    with torch.no_grad():
        next(p for n, p in prepared.model.named_parameters() if "lora_B" in n).fill_(0.1)
    assert any("LoRA B is not zero" in p for p in preflight(spec, prepared, names).problems)


def test_gaussian_init_is_not_flagged(tiny_model_dir, chat_data):
    spec, prepared, names = _build(tiny_model_dir, chat_data, name="lora", args={"init_lora_weights": "gaussian"})
    assert not [p for p in preflight(spec, prepared, names).problems if "LoRA B" in p]


def test_quantization_mismatch_is_caught(tiny_model_dir, chat_data):
    spec, prepared, names = _build(tiny_model_dir, chat_data, name="lora")
    as_qlora = spec.model_copy(update={"model": spec.model.model_copy(update={"quantization": "nf4"})})
    assert any("no bitsandbytes Linear4bit" in p for p in preflight(as_qlora, prepared, names).problems)


def test_target_matches_rules():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    assert target_matches(["q_proj", "up_proj", "k_proj"], names) == {"q_proj": 2, "up_proj": 1, "k_proj": 0}
    assert target_matches(r".*layers\.0\..*", names) == {r".*layers\.0\..*": 2}
    assert target_matches("all-linear", names) == {}


def _spec_file(tmp_path, tiny_model_dir, chat_data, **method):
    import yaml

    raw = {
        "model": {"base": str(tiny_model_dir)},
        "method": {"name": "lora", "r": 4, **method},
        "data": {"train": str(chat_data), "format": "chat", "max_length": 64},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_check_cli_passes_and_prints_the_summary(tmp_path, tiny_model_dir, chat_data, capsys):
    from raypeft.cli import main

    assert main(["check", _spec_file(tmp_path, tiny_model_dir, chat_data), "method.name=dora"]) == 0
    out = capsys.readouterr().out
    assert "pre-flight ok: dora" in out and "lora_magnitude_vector" in out


def test_unmatched_target_exits_2_before_ray_starts(tmp_path, tiny_model_dir, chat_data, capsys):
    import ray

    from raypeft.cli import main

    ray.shutdown()
    spec = _spec_file(tmp_path, tiny_model_dir, chat_data, target_modules=["q_proj", "query_key_value"])
    for cmd in ("check", "train"):
        assert main([cmd, spec]) == 2
        err = capsys.readouterr().err
        assert (
            "method.target_modules" in err and "query_key_value" in err and "got ['q_proj', 'query_key_value']" in err
        )
    assert not ray.is_initialized()
