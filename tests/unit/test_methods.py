"""Every method trains on a tiny random Llama: the loss falls, the base stays frozen, adapters round-trip.

No Ray here: builders are exercised directly with a minimal step loop.
"""

from __future__ import annotations

import pytest
import torch

from pipelines import data as D
from pipelines.model import load_base, methods
from pipelines.spec import SpecError
from tests.conftest import tiny_spec

GALORE = {"galore": {"rank": 4, "update_proj_gap": 2}}
CASES = {
    "lora": ({}, 0.01),
    "rslora": ({}, 0.01),
    "lora_plus": ({}, 0.01),
    "dora": ({}, 0.01),
    "qlora": ({}, 0.01),
    "qdora": ({}, 0.01),
    "galore": (GALORE, 0.01),
    "galore_layerwise": (GALORE, 0.01),
    "adalora": ({}, 0.01),
    "loha": ({}, 0.01),
    "lokr": ({}, 0.01),
    "ia3": ({}, 0.05),
    "vera": ({}, 0.01),
    "vblora": ({"args": {"vector_length": 16, "num_vectors": 32}}, 0.01),
    "hra": ({}, 0.01),
    "waveft": ({"args": {"n_frequency": 64}}, 0.01),
    "fourierft": ({"args": {"n_frequency": 64}}, 0.05),
    "boft": ({}, 0.01),
    "prompt_tuning": ({"args": {"num_virtual_tokens": 8}}, 0.05),
    "prefix_tuning": ({"args": {"num_virtual_tokens": 8}}, 0.05),
}


def _setup(tiny_model_dir, chat_data, name, extra, lr, steps=10):
    spec = tiny_spec(tiny_model_dir, chat_data, method={"name": name, **extra}, train={"max_steps": steps, "lr": lr})
    torch.manual_seed(0)
    base, tok, _ = load_base(spec)
    examples = D.encode_all(D.load_records(str(chat_data)), spec.data, tok)
    batch = D.collate(examples[:8], tok.pad_token_id)
    return spec, base, tok, batch


def _train(prepared, batch, steps):
    losses = []
    for step in range(steps):
        loss = prepared.model(**batch).loss
        loss.backward()
        if not prepared.steps_in_backward:
            prepared.optimizer.step()
        if prepared.after_step:
            prepared.after_step(step)
        prepared.optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _base_weight(model) -> torch.Tensor:
    for name, mod in model.named_modules():
        if name.endswith("layers.0.self_attn.q_proj"):
            w = mod.base_layer.weight if hasattr(mod, "base_layer") else mod.weight
            # raw bytes: packed 4-bit weights stored as floats may hold NaN bit patterns
            return w.detach().clone().contiguous().view(torch.uint8)
    raise AssertionError("q_proj not found")


@pytest.mark.parametrize("name", list(CASES))
def test_method_trains_and_base_stays_frozen(tiny_model_dir, chat_data, name):
    extra, lr = CASES[name]
    spec, base, _, batch = _setup(tiny_model_dir, chat_data, name, extra, lr)
    prepared = methods.build(spec, base)
    with torch.no_grad():  # bitsandbytes repacks 4-bit weights for its CPU kernels on the first forward
        prepared.model(**batch)
    before = _base_weight(prepared.model)
    losses = _train(prepared, batch, 10)
    assert losses[-1] < losses[0] - 0.02, f"{name}: loss did not fall: {losses}"
    after = _base_weight(prepared.model)
    if prepared.is_peft:
        assert torch.equal(before, after), f"{name}: base weight changed"
        trainable = [n for n, p in prepared.model.named_parameters() if p.requires_grad]
        assert trainable and all("base_layer" not in n for n in trainable)
    else:  # full-parameter GaLore must actually move the weights
        assert not torch.equal(before, after)


def test_qlora_uses_bnb_4bit_linears(tiny_model_dir, chat_data):
    import bitsandbytes as bnb

    spec, base, _, _ = _setup(tiny_model_dir, chat_data, "qlora", {}, 0.01)
    assert spec.quantization() == "nf4"
    prepared = methods.build(spec, base)
    q = prepared.model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, bnb.nn.Linear4bit)
    assert q.base_layer.weight.quant_state.quant_type == "nf4"
    assert q.base_layer.weight.quant_state.nested  # double quant


def test_int8_base_trains_lora(tiny_model_dir, chat_data):
    import bitsandbytes as bnb

    spec, base, _, batch = _setup(tiny_model_dir, chat_data, "lora", {}, 0.01)
    spec = tiny_spec(tiny_model_dir, chat_data, model={"quantization": "int8"}, train={"lr": 0.01})
    base, _, _ = load_base(spec)
    prepared = methods.build(spec, base)
    assert isinstance(prepared.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear8bitLt)
    losses = _train(prepared, batch, 8)
    assert losses[-1] < losses[0]


def test_lora_plus_groups_have_the_ratio(tiny_model_dir, chat_data):
    spec, base, _, _ = _setup(tiny_model_dir, chat_data, "lora_plus", {"loraplus_ratio": 8.0}, 0.01)
    opt = methods.build(spec, base).optimizer
    lrs = sorted({g["lr"] for g in opt.param_groups if g["params"]})
    assert 0.01 in lrs and pytest.approx(0.08) in lrs
    names = {id(p): n for n, p in methods.build(spec, load_base(spec)[0]).model.named_parameters()}
    del names  # groups are keyed by parameter identity; the ratio check above is the contract


def test_adalora_reallocates_rank_during_training(tiny_model_dir, chat_data):
    spec, base, _, batch = _setup(
        tiny_model_dir, chat_data, "adalora", {"r": 8, "args": {"target_r": 2}}, 0.01, steps=20
    )
    prepared = methods.build(spec, base)
    assert prepared.after_step is not None
    cfg = prepared.model.peft_config["default"]
    assert cfg.rank_pattern is None
    _train(prepared, batch, 20)
    pattern = prepared.model.peft_config["default"].rank_pattern
    assert pattern, "update_and_allocate never produced a rank pattern"
    kept = [sum(mask) for mask in pattern.values()]
    assert min(kept) < 8, f"no rank was pruned: {kept}"


def test_galore_optimizer_projects_2d_weights(tiny_model_dir, chat_data):
    spec, base, _, _ = _setup(tiny_model_dir, chat_data, "galore", GALORE, 0.01)
    opt = methods.build(spec, base).optimizer
    galore_groups = [g for g in opt.param_groups if "rank" in g]
    assert len(galore_groups) == 1
    params = galore_groups[0]["params"]
    assert params and all(p.dim() == 2 for p in params)
    n_linear = sum(1 for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    assert len(params) == n_linear


@pytest.mark.parametrize("name", ["lora", "dora", "loha", "ia3"])
def test_adapter_roundtrip_with_plain_peft(tiny_model_dir, chat_data, tmp_path, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    extra, lr = CASES[name]
    spec, base, _, batch = _setup(tiny_model_dir, chat_data, name, extra, lr)
    prepared = methods.build(spec, base)
    _train(prepared, batch, 5)
    model = prepared.model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_merged_equals_unmerged(tiny_model_dir, chat_data, name):
    spec, base, _, batch = _setup(tiny_model_dir, chat_data, name, {}, 0.01)
    prepared = methods.build(spec, base)
    _train(prepared, batch, 5)
    model = prepared.model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        merged_model = model.merge_and_unload()
        merged = merged_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)


def test_rank_and_alpha_patterns_pass_through(tiny_model_dir, chat_data):
    spec, base, _, _ = _setup(
        tiny_model_dir,
        chat_data,
        "lora",
        {"r": 4, "rank_pattern": {"q_proj": 8}, "alpha_pattern": {"q_proj": 16}},
        0.01,
    )
    model = methods.build(spec, base).model
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    v = model.base_model.model.model.layers[0].self_attn.v_proj
    assert q.r["default"] == 8 and v.r["default"] == 4
    assert q.scaling["default"] == pytest.approx(16 / 8)
    assert v.scaling["default"] == pytest.approx(8 / 4)


def test_rslora_scale(tiny_model_dir, chat_data):
    spec, base, _, _ = _setup(tiny_model_dir, chat_data, "rslora", {"r": 4, "alpha": 8}, 0.01)
    q = methods.build(spec, base).model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / 4**0.5)


def test_unknown_method_and_bad_args_are_spec_errors(tiny_model_dir, chat_data):
    with pytest.raises(SpecError) as e:
        tiny_spec(tiny_model_dir, chat_data, method={"name": "lorax"})
    assert ("method.name" in [f for f, _ in e.value.problems]) and "lorax" in str(e.value)
    with pytest.raises(SpecError) as e:
        tiny_spec(tiny_model_dir, chat_data, method={"name": "vera", "args": {"nonsense": 3}})
    assert "method.args.nonsense" in [f for f, _ in e.value.problems]


def test_an_eval_between_qlora_steps_leaves_the_training_path_as_it_was(tiny_model_dir, chat_data):
    """bitsandbytes repacks CPU 4-bit weights at the first eval-mode no-grad forward (on AVX512-BF16 CPUs),
    after which training takes another kernel. With ``one_4bit_layout`` (what every training worker applies),
    a probe between steps changes nothing, so a run resumed from a checkpoint matches the run uninterrupted."""
    import random

    from pipelines.model import one_4bit_layout
    from pipelines.train import probe_logits

    spec = tiny_spec(tiny_model_dir, chat_data, method={"name": "qlora", "r": 4, "dropout": 0.1})

    def train(probe: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        random.seed(0)
        base, tok, _ = load_base(spec)
        one_4bit_layout(base)
        p = methods.build(spec, base)
        p.model.train()
        ex = D.encode_all(D.load_records(str(chat_data)), spec.data, tok)
        for step in range(5):
            p.model(**D.collate(ex[4 * step : 4 * step + 4], tok.pad_token_id)).loss.backward()
            p.optimizer.step()
            p.optimizer.zero_grad()
            if probe and step == 1:
                probe_logits(p.model, ex[0], torch.device("cpu"))  # what a checkpoint does
        return {n: t.detach().clone() for n, t in p.model.named_parameters() if t.requires_grad}

    a, b = train(probe=False), train(probe=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_without_args_every_lora_family_config_the_schema_accepts_builds(tiny_model_dir, chat_data):
    """The LoRA family's validation imports PEFT only for free-form ``method.args`` (a bad spec is refused in
    well under a second): that is sound only while every method section the schema and the target checks
    accept builds a ``LoraConfig``, with each method's switches. Drawn here, so a PEFT upgrade that adds a
    check of its own fails this test rather than a job on its workers."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    family = ["lora", "rslora", "lora_plus", "dora", "qlora", "qdora"]

    regex = st.sampled_from([r".*\.q_proj", r"model\.layers\.[0-3]\..*_proj", r".*(up|down)_proj"])
    suffixes = st.lists(st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj"]), min_size=1)
    section = st.fixed_dictionaries(
        {
            "name": st.sampled_from(family),
            "r": st.integers(1, 65536),
            "alpha": st.floats(1e-6, 1e6, allow_nan=False),
            "dropout": st.floats(0, 0.999),
            "target_modules": st.one_of(st.just("all-linear"), regex, suffixes),
            "rank_pattern": st.dictionaries(regex, st.integers(1, 65536), max_size=2),
            "alpha_pattern": st.dictionaries(regex, st.floats(1e-6, 1e6, allow_nan=False), max_size=2),
        }
    )

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(section)
    def check(method):
        spec = tiny_spec(tiny_model_dir, chat_data, method=method)  # validates: no PEFT config built
        methods.get_method(method["name"]).peft_config(spec, None)  # raises if PEFT would refuse it

    check()


def test_bases_loaded_by_two_threads_at_once_leave_transformers_able_to_tie_and_initialize(tiny_model_dir, chat_data):
    """transformers swaps ``tie_weights``/``init_weights`` for no-ops on the class while it loads; two loads at once
    (a gated promote's evaluations, a server's threads) could leave the no-ops there for the whole process."""
    import threading

    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

    tie, init = PreTrainedModel.tie_weights, PreTrainedModel.init_weights
    spec = tiny_spec(tiny_model_dir, chat_data)
    try:
        for _ in range(4):
            threads = [
                threading.Thread(target=load_base, args=(spec,), kwargs={"log": lambda *_: None}) for _ in range(3)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert (PreTrainedModel.tie_weights, PreTrainedModel.init_weights) == (tie, init)
    finally:  # a failure here must not untie every later test's models
        PreTrainedModel.tie_weights, PreTrainedModel.init_weights = tie, init
    tied = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            tie_word_embeddings=True,
        )
    )
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
