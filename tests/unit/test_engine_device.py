"""The engine's device discipline, shown without a GPU.

The model is placed on PyTorch's ``meta`` device (shapes and dtypes, no data), and every
aten op of a generation step runs under ``_OneDevice``, a dispatch mode that raises when
an op mixes a device tensor with a CPU tensor that is not a scalar, as CUDA would. So any
tensor the engine made on the host and handed to the model (ids, masks, positions, slot
indices, adapter weights, sampled tokens) fails the test. Why ``meta`` and not a fake CUDA
device under ``FakeTensorMode``: transformers' mask code indexes with ``None``, which the
fake CUDA path cannot run on a CPU-only build of torch; and plain ``meta`` lets some mixed
ops through (``index_select``, ``matmul``), hence the dispatch mode. The one
device-to-host read of a step (``Engine._host``) is replaced, since ``meta`` holds no values.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from serving.backend import Backend, Request
from serving.engine import Engine
from serving.lora_batch import MultiLoraModel
from tests.unit.test_engine import adapters  # noqa: F401 - the fixture

aten = torch.ops.aten
_COPIES = {aten._to_copy.default, aten.copy_.default, aten.lift_fresh.default, aten.detach.default}


class _OneDevice(TorchDispatchMode):
    """Raise when an op (other than an explicit copy) mixes devices, 0-dim CPU scalars excepted."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0}
        if len(devices) > 1 and func not in _COPIES:
            raise AssertionError(f"{func} mixes devices {sorted(devices)}")
        return func(*args, **kwargs)


def _meta_engine(tiny_model_dir, adapters):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    # eager attention: SDPA's mask shortcut reads mask values, which meta tensors do not have
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval().to("meta")
    multi = MultiLoraModel(base, slots=4, r_max=8)
    engine = Engine(multi, tok, lambda name: adapters[name])
    engine._host = lambda tokens: [5] * tokens.shape[0]  # meta has no values to read back
    return engine, tok


def _run(engine, reqs):
    for name in {r.adapter for r in reqs} - {None}:
        engine.add_adapter(name)
    with _OneDevice():
        for r in reqs[:2]:
            engine.submit(r)
        engine.step()
        for r in reqs[2:]:  # join a running batch: the caches are merged on the device
            engine.submit(r)
        for _ in range(20):
            engine.step()


def test_a_step_keeps_every_tensor_on_the_models_device(tiny_model_dir, adapters):  # noqa: F811
    engine, tok = _meta_engine(tiny_model_dir, adapters)
    assert isinstance(engine, Backend)
    layer = next(iter(engine.multi.layers.values()))
    assert layer.A.device.type == "meta" and layer.A.dtype == engine.multi.dtype
    p = tok("hello there", add_special_tokens=False)["input_ids"]
    reqs = [
        Request(p, "a", max_tokens=4),
        Request(p[:1], None, max_tokens=6),
        Request(p, "dora", max_tokens=3),  # DoRA's norms are computed at load, beside the base weight
        Request(p, "b", max_tokens=5),
    ]
    _run(engine, reqs)
    assert engine.stats["failed_steps"] == 0
    assert [r.finish_reason for r in reqs] == ["length"] * 4
    assert [len(r.out_ids) for r in reqs] == [4, 6, 3, 5]


def test_the_check_catches_a_host_tensor(tiny_model_dir, adapters):  # noqa: F811
    """The control: slot indices left on the CPU (as the engine once had them) fail the step."""
    engine, tok = _meta_engine(tiny_model_dir, adapters)
    engine.multi.ctx.device = torch.device("cpu")
    p = tok("hello", add_special_tokens=False)["input_ids"]
    reqs = [Request(p, "a", max_tokens=3), Request(p, "b", max_tokens=3)]
    _run(engine, reqs)
    assert engine.stats["failed_steps"] >= 1
    for req in reqs:
        events = [req.events.get_nowait() for _ in range(req.events.qsize())]
        kind, message = events[-1]
        assert kind == "error" and "mixes devices" in message, events


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapters_are_stacked_in_the_serving_dtype(tiny_model_dir, adapters, dtype):  # noqa: F811
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    multi = MultiLoraModel(base, slots=2, r_max=8)
    assert {layer.A.dtype for layer in multi.layers.values()} == {dtype}
