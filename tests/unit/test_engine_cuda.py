"""The engine on a real GPU (``gpu``: skipped without CUDA): bf16 adapters stacked on the device,
and mixed batches equal to each adapter alone under PEFT."""

from __future__ import annotations

import pytest
import torch

from serving.engine import Engine, Request
from serving.lora_batch import MultiLoraModel
from tests.unit.test_engine import _drain, adapters  # noqa: F401 - the fixture

pytestmark = pytest.mark.gpu


def _cuda_engine(tiny_model_dir, adapters, dtype):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval().to("cuda")
    return Engine(MultiLoraModel(base, slots=4, r_max=8), tok, lambda name: adapters[name]), tok, base


def _peft_alone(tiny_model_dir, adapter_dir, prompt, n, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval().to("cuda")
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir, autocast_adapter_dtype=False).eval()
    ids = torch.tensor([prompt], device="cuda")
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def test_engine_keeps_everything_on_the_gpu_in_bf16(tiny_model_dir, adapters):  # noqa: F811
    engine, tok, _ = _cuda_engine(tiny_model_dir, adapters, torch.bfloat16)
    layer = next(iter(engine.multi.layers.values()))
    assert layer.A.is_cuda and layer.A.dtype == torch.bfloat16
    p = tok("hello there", add_special_tokens=False)["input_ids"]
    reqs = [engine.submit(Request(p, name, max_tokens=8, ignore_eos=True, seed=1)) for name in ("a", "dora", None)]
    reqs.append(engine.submit(Request(p, "b", max_tokens=8, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)))
    _drain(engine, reqs)
    assert engine.stats["failed_steps"] == 0 and all(len(r.out_ids) == 8 for r in reqs)


def test_mixed_batch_equals_each_adapter_alone_on_cuda(tiny_model_dir, adapters):  # noqa: F811
    engine, tok, _ = _cuda_engine(tiny_model_dir, adapters, torch.float32)  # fp32: token-for-token comparable
    p = tok("the quick brown fox", add_special_tokens=False)["input_ids"]
    reqs = [engine.submit(Request(p, name, max_tokens=10)) for name in ("a", "b", "dora", None)]
    _drain(engine, reqs)
    for req in reqs:
        ref = _peft_alone(tiny_model_dir, adapters.get(req.adapter), p, 10, torch.float32)
        assert req.out_ids == [t for t in ref if t not in engine.eos], req.adapter


def test_a_step_on_cuda_reads_the_device_once(tiny_model_dir, adapters):  # noqa: F811
    """As the CPU test (tests/unit/test_engine.py), on CUDA: each decode step of greedy, sampled and logprob
    rows reads device values back once (``tests/syncs.py``). Host-to-device copies of the step's inputs
    are not counted here; with CUDA graphs they go through persistent buffers."""
    from tests.syncs import count_syncs

    engine, tok, _ = _cuda_engine(tiny_model_dir, adapters, torch.bfloat16)
    p = tok("hello there", add_special_tokens=False)["input_ids"]
    reqs = [
        engine.submit(Request(p, "a", max_tokens=12, ignore_eos=True)),
        engine.submit(Request(p, "b", max_tokens=12, temperature=0.9, top_p=0.9, seed=2, ignore_eos=True)),
        engine.submit(Request(p, None, max_tokens=12, logprobs=2, ignore_eos=True)),
    ]
    while engine.n < 3:
        engine.step()
    for _ in range(5):
        with count_syncs() as syncs:
            engine.step()
        assert dict(syncs) == {"tolist": 1}, dict(syncs)
    _drain(engine, reqs)
