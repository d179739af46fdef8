"""Base fidelity: an adapter is served on the base it was trained on, or refused naming what differs
(exit 2 at start for adapters configured up front), and a layerwise-planned adapter is served exactly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.spec import SpecError
from serving.fidelity import difference, record_of, served_record
from serving.spec import validate
from tests.unit.test_lora_batch import _make_adapter

PLAN = {r"model\.layers\.0\..*": 4, r"model\.layers\.1\.self_attn\..*": 8, r"model\.layers\.1\.mlp\..*": 16}


def _record(adapter, **meta):
    (adapter / "raypeft.json").write_text(json.dumps({"method": "lora", "job": "t", **meta}))
    return adapter


@pytest.fixture(scope="module")
def planned(tiny_model_dir, tmp_path_factory):
    """An adapter as `raypeft layerwise` leaves it: trained on a base of 4-, 8- and 16-bit linears."""
    d = _make_adapter(tiny_model_dir, tmp_path_factory.mktemp("planned") / "adapter", 7, r=4, lora_alpha=8)
    return _record(d, base=str(tiny_model_dir), quantization="none", double_quant=True, quantization_plan=PLAN)


def test_difference_names_each_field_and_ignores_what_does_not_matter(tiny_model_dir):
    base = {"base": str(tiny_model_dir), "quantization": "none", "double_quant": True, "quantization_plan": {}}
    assert difference({}, base) is None  # no raypeft.json: served as it is
    assert difference({**base, "base": str(tiny_model_dir) + "/"}, base) is None  # the same directory
    assert difference({**base, "double_quant": False}, base) is None  # no NF4 on either side
    diff = difference({**base, "quantization": "nf4", "quantization_plan": {"x": 8}}, base)
    assert (
        diff
        == "model.quantization was 'nf4' in training, 'none' here; model.quantization_plan was {'x': 8} in training, {} here"
    )
    assert "model.base was 'other-model'" in difference({**base, "base": "other-model"}, base)


def test_an_adapter_configured_up_front_on_another_base_fails_validation(tiny_model_dir, planned, tmp_path):
    with pytest.raises(SpecError) as e:
        validate({"model": {"base": str(tiny_model_dir)}, "adapters": {"lw": str(planned)}})
    [(field, message)] = e.value.problems
    assert field == "adapters.lw" and "model.quantization_plan was" in message and str(planned) in message
    ok = validate({"model": {"base": str(tiny_model_dir), "quantization_plan": PLAN}, "adapters": {"lw": str(planned)}})
    assert served_record(ok)["quantization_plan"] == PLAN

    spec = tmp_path / "serve.yaml"
    spec.write_text(f"model: {{base: {tiny_model_dir}}}\nadapters: {{lw: {planned}}}\n")
    out = subprocess.run(
        [str(Path(sys.executable).parent / "raypeft"), "serve", str(spec)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2, out.stderr
    assert "adapters.lw" in out.stderr and "quantization_plan" in out.stderr and "Started a local Ray" not in out.stderr


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ({"from_adapter": "nope", "name": "b"}, "not a name in `adapters`"),
        ({"from_adapter": "lw", "quantization": "nf4", "name": "b"}, "set either from_adapter or model.quantization"),
        ({"from_adapter": "lw"}, "model.name"),
        ({"from_adapter": "reg", "name": "b"}, "pin a version"),
    ],
)
def test_from_adapter_is_refused_when_malformed(planned, model, says):
    with pytest.raises(SpecError) as e:
        validate({"model": model, "adapters": {"lw": str(planned), "reg": "models:/lw@champion"}})
    assert any(says in f"{f}: {m}" for f, m in e.value.problems), e.value.problems


def test_a_layerwise_planned_adapter_is_served_exactly(tiny_model_dir, planned):
    """``from_adapter`` rebuilds the mixed 4/8/16-bit base; the engine's greedy output equals PEFT's on it."""
    from peft import PeftModel

    from pipelines.model import load_base, trained_base_spec
    from pipelines.spec import validate as job_validate
    from serving.engine import Engine, Request
    from serving.lora_batch import MultiLoraModel
    from tests.unit.test_engine import _drain

    spec = validate({"model": {"from_adapter": "lw", "name": "tiny-lw"}, "adapters": {"lw": str(planned)}})
    record = served_record(spec)
    assert record == record_of(planned) and record["quantization_plan"] == PLAN
    base, tok, _ = load_base(job_validate({"model": record}), device="cpu", log=lambda *_: None)
    kinds = {type(m).__name__ for m in base.modules()}
    assert {"Linear4bit", "Linear8bitLt", "Linear"} <= kinds  # 4, 8 and 16 bits in one model
    engine = Engine(MultiLoraModel(base.eval(), slots=2, r_max=8), tok, lambda name: str(planned))
    prompt = tok("hello there", add_special_tokens=False)["input_ids"]
    req = engine.submit(Request(prompt, "lw", max_tokens=8))
    _drain(engine, [req])

    ref_base, _, _ = load_base(trained_base_spec(planned), device="cpu", log=lambda *_: None)
    ref = PeftModel.from_pretrained(ref_base, planned).eval()
    ids = torch.tensor([prompt])
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    expected = [t for t in out[0, len(prompt) :].tolist() if t != tok.eos_token_id]
    assert req.out_ids == expected and expected


def test_validation_reads_records_without_copying_adapters(planned, tmp_path):
    copy = shutil.copytree(planned, tmp_path / "copy")
    (copy / "raypeft.json").unlink()
    assert record_of(copy) == {}  # a plain PEFT adapter: no record, nothing to refuse
