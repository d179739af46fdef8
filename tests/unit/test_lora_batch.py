"""Mixed-adapter batches: every row of one forward pass equals its adapter served alone by PEFT."""

from __future__ import annotations

import pytest
import torch

from serving.lora_batch import AdapterWeights, MultiLoraModel


def _make_adapter(tiny_model_dir, out, seed: int, **cfg):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg.setdefault("target_modules", "all-linear")
    config = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **cfg)
    model = get_peft_model(base, config)
    with torch.no_grad():  # random magnitudes too, so DoRA's scale is not trivially 1
        for n, p in model.named_parameters():
            if "magnitude" in n:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return {
        "lora-a": _make_adapter(tiny_model_dir, d / "a", 1, r=4, lora_alpha=8),
        "lora-b": _make_adapter(
            tiny_model_dir, d / "b", 2, r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
        ),
        "rslora": _make_adapter(tiny_model_dir, d / "c", 3, r=2, lora_alpha=4, use_rslora=True),
        "dora": _make_adapter(tiny_model_dir, d / "d", 4, r=4, lora_alpha=8, use_dora=True),
    }


def _peft_logits(tiny_model_dir, path, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), path).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_mixed_batch_equals_each_adapter_alone(tiny_model_dir, adapters):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (5, 16))
    ids[4] = torch.arange(3, 19)
    with torch.no_grad():
        plain = base(input_ids=ids).logits  # before the layers are wrapped
    multi = MultiLoraModel(base, slots=5, r_max=8)
    names = list(adapters)
    for slot, name in enumerate(names, start=1):
        multi.load(slot, AdapterWeights.from_dir(name, adapters[name]))
    assert multi.dora_slots == {4}

    multi.rows([1, 2, 3, 4, 0])  # four adapters and the bare base in one batch
    with torch.no_grad():
        mixed = multi.model(input_ids=ids).logits
    for row, name in enumerate(names):
        alone = _peft_logits(tiny_model_dir, adapters[name], ids[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=2e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        assert (alone - plain[row : row + 1]).abs().max() > 1e-2, f"{name} is a no-op"
    torch.testing.assert_close(mixed[4:], plain[4:], atol=1e-5, rtol=1e-5)


def test_slots_are_replaced_and_evicted(tiny_model_dir, adapters):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(3, 300, (1, 12))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    multi = MultiLoraModel(base, slots=2, r_max=8)
    multi.load(1, AdapterWeights.from_dir("dora", adapters["dora"]))
    multi.load(1, AdapterWeights.from_dir("lora-a", adapters["lora-a"]))  # replaces dora in the slot
    assert multi.slot_of == {"lora-a": 1} and not multi.dora_slots
    multi.rows([1])
    with torch.no_grad():
        got = multi.model(input_ids=ids).logits
    torch.testing.assert_close(got, _peft_logits(tiny_model_dir, adapters["lora-a"], ids), atol=2e-5, rtol=1e-5)
    multi.evict(1)
    with torch.no_grad():
        torch.testing.assert_close(multi.model(input_ids=ids).logits, plain, atol=1e-6, rtol=1e-6)


def test_bad_adapters_are_refused(tiny_model_dir, adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    multi = MultiLoraModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir), slots=2, r_max=4)
    with pytest.raises(ValueError, match="rank 8 > the served maximum 4"):
        multi.load(1, AdapterWeights.from_dir("lora-b", adapters["lora-b"]))
    with pytest.raises(ValueError, match="slot 2 out of range"):
        multi.load(2, AdapterWeights.from_dir("lora-a", adapters["lora-a"]))
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    (bin_only / "adapter_config.json").write_text((adapters["lora-a"] / "adapter_config.json").read_text())
    (bin_only / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickled .bin adapters are refused"):
        AdapterWeights.from_dir("bin", bin_only)


def test_dora_scale_is_computed_without_the_weight_sized_sum_and_once_per_adapter(tiny_model_dir, adapters):
    """``||W + s·B·A||`` by its expansion equals the direct norm; ``prepare`` computes it once, so a slot
    load (on the decode loop) computes nothing, and the stacks stay as wide as the largest rank loaded."""
    from transformers import AutoModelForCausalLM

    multi = MultiLoraModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir), slots=3, r_max=8)
    assert {layer.rank for layer in multi.layers.values()} == {0}  # nothing loaded: nothing allocated
    dora = AdapterWeights.from_dir("dora", adapters["dora"])
    name, (a, b, s, m) = next(iter(dora.layers.items()))
    layer = multi.layers[name]
    direct = m.float() / (layer.base_weight() + s * (b.float() @ a.float())).norm(dim=1)
    torch.testing.assert_close(layer.dora_scale(a, b, s, m), direct, rtol=1e-5, atol=1e-6)
    multi.prepare(dora)
    assert set(dora.g) == {n for n, (_, _, _, mag) in dora.layers.items() if mag is not None}
    calls = []
    original = type(layer).dora_scale
    type(layer).dora_scale = lambda self, *args: calls.append(1) or original(self, *args)
    try:
        multi.load(1, dora)
    finally:
        type(layer).dora_scale = original
    assert calls == []
    torch.testing.assert_close(layer.g[1], direct.to(layer.g.dtype))
    assert layer.rank == 4  # a rank-4 adapter: rank-4 stacks, though the server allows 8
    q = multi.layers["model.layers.0.self_attn.q_proj"]
    before = q.B[:, 1].clone()  # B is [out, slots, r]
    multi.load(2, AdapterWeights.from_dir("lora-b", adapters["lora-b"]))  # rank 8 widens the touched layers
    assert q.rank == 8
    assert torch.equal(q.B[:, 1, :4], before) and not q.B[:, 1, 4:].any()  # slot 1 kept, its new ranks zero


def test_a_pass_reads_in_place_only_a_slot_range_its_device_measured_faster():
    """Decoding rows read the stacks in place while their slots' range is no wider than the rows and, on a
    CPU, than 8 slots (``IN_PLACE_MAX_SPAN``: beyond it each row multiplies span× its own FLOPs, and the per-row
    gather measured faster); wider ranges gather. A device with no measurement keeps only the token-slot bound."""
    from serving.lora_batch import IN_PLACE_TOKEN_SLOTS, BatchContext, in_place_span

    def in_place(rows: list[int], flat: bool = False) -> bool:
        ctx = BatchContext("cpu")
        ranks = dict.fromkeys(rows, 4)
        ctx.set_flat(rows, [], ranks=ranks) if flat else ctx.set(rows, ranks=ranks)
        return ctx.onehot is not None

    assert in_place(list(range(1, 9)))  # 8 rows, 8 slots
    assert in_place([1 + i % 8 for i in range(32)])  # 32 rows over 8 slots
    assert not in_place(list(range(1, 17)))  # 16 rows, 16 slots: gathered on a CPU
    assert not in_place(list(range(1, 17)), flat=True)
    assert not in_place([1, 9])  # a range of 9 for 2 rows: wider than the rows, on any device
    assert in_place_span(torch.device("cpu")) == 8
    assert in_place_span(torch.device("cuda")) == IN_PLACE_TOKEN_SLOTS  # not measured there yet


@pytest.mark.parametrize("bias", [False, True])
def test_the_uniform_path_equals_the_per_pass_paths(bias):
    """``every_row`` (the compiled decode step's one path: each row's stacks gathered at full width, the DoRA
    scale always applied) gives what the mixed paths give for the same rows: bare-base rows, LoRA rows of two
    ranks and DoRA rows together, to float32 rounding."""
    from torch import nn

    from serving.lora_batch import BatchContext, MultiLoraLinear

    torch.manual_seed(0)
    ctx = BatchContext("cpu")
    layer = MultiLoraLinear(nn.Linear(16, 12, bias=bias), ctx, slots=4, r_max=8, dtype=torch.float32)
    layer.load_slot(1, torch.randn(4, 16), torch.randn(12, 4), 2.0, None)
    layer.load_slot(2, torch.randn(8, 16), torch.randn(12, 8), 0.5, None)
    layer.load_slot(3, torch.randn(4, 16), torch.randn(12, 4), 1.0, torch.rand(12) + 0.5)  # DoRA
    rows = [0, 3, 1, 2, 1, 0]
    x = torch.randn(1, len(rows), 16)
    with torch.no_grad():
        ctx.set_flat(rows, [], dora_slots={3}, ranks={1: 4, 2: 8, 3: 4})
        want = layer(x)
        ctx.row_slots = torch.zeros(8, dtype=torch.long)
        ctx.set_uniform(rows)
        got = layer(x)
        ctx.set(None)
        base = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, base), "the adapters changed nothing: the check would pass on the bare base"
    assert ctx.uniform is False and ctx.row_slots.tolist()[: len(rows)] == rows
