"""The engine's compiled decode step (``Engine(compile_decode=True)``, serve spec ``limits.compile_decode``):
it generates the eager engine's tokens, token for token in fp32, while rows of different adapters (LoRA of
two ranks, DoRA, the bare base) join, finish and leave, adapters are evicted and reloaded into the slots
the compiled step reads, and the batch crosses from one row to many and back; and everything it compiles,
it compiles before the first request (two graphs), so no later step compiles."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from serving.engine import Engine, Request
from tests.unit.test_engine import _engine, adapters  # noqa: F401 - the fixture

# (step, prompt, adapter, max_tokens): with 3 slots (2 adapters resident) "dora" evicts an adapter of the
# first two, and "a" comes back after it; 9 prompt tokens in chunks of at most 4 put eager prefill passes
# between the compiled decode passes; the last request decodes alone (one row) and then with a second
SCHEDULE = [
    (0, "hello there", "a", 12),
    (0, "a+b=", None, 7),
    (2, "the quick brown fox jumps over the lazy dog", "b", 9),
    (14, "x", "dora", 10),
    (14, "zz top", None, 5),
    (30, "once more", "a", 14),
    (52, "solo", "dora", 30),
    (70, "late", "b", 6),
]


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _serve(engine: Engine, tok) -> list[list[int]]:
    reqs = []
    for step in range(400):
        for at, prompt, adapter, n in SCHEDULE:
            if at == step:
                ids = tok(prompt, add_special_tokens=False)["input_ids"]
                reqs.append(engine.submit(Request(ids, adapter, max_tokens=n, ignore_eos=True)))
        engine.step()
        if step > SCHEDULE[-1][0] and all(r.finish_reason for r in reqs):
            return [r.out_ids for r in reqs]
    raise AssertionError("requests did not finish")


def test_the_compiled_decode_step_generates_the_eager_tokens_and_compiles_only_at_start(
    tiny_model_dir,
    adapters,  # noqa: F811
):
    """Traced by dynamo and run by its ``eager`` backend: the graphs, their guards and what they read (the
    slots reloaded in place, the rows' slot buffer, the cache) are what is under test here, at a tenth of
    inductor's compile time. Inductor's kernels run in ``test_serve_replica.py`` (the replica's path) and in
    ``benchmarks.compile_decode`` (SmolLM2-135M's shape, the same tokens as eager or it fails)."""
    torch._dynamo.reset()
    kw = {"slots": 3, "prefill_chunk_tokens": 4, "prefill_slowdown": None}
    eager, tok = _engine(tiny_model_dir, adapters, **kw)
    want = _serve(eager, tok)

    engine, _ = _engine(tiny_model_dir, adapters, compile_decode=True, compile_backend="eager", **kw)
    before = _graphs()
    assert engine.warm() > 0
    assert _graphs() - before == 2, "one graph for a single row, one for any batch of 2+"
    assert engine.metrics()["requests_total"] == 0, "the warm-up's requests are not counted"
    assert engine.budget.decode_step_s is None, "the warm-up's step times do not size the prompt chunks"

    got = _serve(engine, tok)
    assert got == want
    assert _graphs() - before == 2, "a step after the warm-up compiled again"
    m = engine.metrics()
    assert m["adapter_slot_evictions_total"] >= 2, "the schedule did not reload slots under the compiled step"
    assert 0 < m["engine_compiled_steps_total"] < m["engine_steps_total"], m
    assert engine.warm() == 0.0, "warming twice runs nothing"


def test_without_compile_decode_nothing_is_compiled_and_the_slots_stay_narrow(tiny_model_dir, adapters):  # noqa: F811
    engine, tok = _engine(tiny_model_dir, adapters)
    assert engine.warm() == 0.0
    assert all(layer.rank == 0 for layer in engine.multi.layers.values())  # grown only by the adapters loaded
    req = engine.submit(Request(tok("hi", add_special_tokens=False)["input_ids"], "a", max_tokens=3))
    while not req.finish_reason:
        engine.step()
    assert engine.metrics()["engine_compiled_steps_total"] == 0


def test_the_uniform_path_refuses_more_rows_than_it_was_widened_for(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from serving.lora_batch import MultiLoraModel

    multi = MultiLoraModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), slots=3, r_max=8)
    with pytest.raises(ValueError, match="widen"):
        multi.every_row([0, 1])
    multi.widen(2)
    assert all(layer.rank == 8 for layer in multi.layers.values())
    multi.every_row([1, 0])
    assert multi.ctx.row_slots.tolist() == [1, 0]
    with pytest.raises(ValueError, match="3 rows"):
        multi.every_row([0, 1, 2])


@pytest.mark.gpu
def test_the_compiled_decode_step_on_cuda_generates_the_eager_tokens(tiny_model_dir, adapters):  # noqa: F811
    """The same schedule on CUDA in fp32: the compiled step's tokens equal the eager engine's, and after the
    warm-up nothing compiles again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.lora_batch import MultiLoraModel

    torch._dynamo.reset()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def engine(compiled: bool) -> Engine:
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval().to("cuda")
        multi = MultiLoraModel(base, slots=3, r_max=8)
        kw = {"prefill_chunk_tokens": 4, "prefill_slowdown": None, "compile_decode": compiled}
        return Engine(multi, tok, lambda name: adapters[name], **kw)

    want = _serve(engine(False), tok)
    compiled = engine(True)
    compiled.warm()
    before = _graphs()
    assert _serve(compiled, tok) == want
    assert _graphs() == before


def test_a_decode_step_that_cannot_compile_stops_the_replica_naming_the_option(tiny_model_dir, adapters):  # noqa: F811
    """If compiling fails (no C++ compiler for inductor, say), the warm-up raises, naming the option and the
    error, instead of a replica that fails every request later."""
    engine, _ = _engine(tiny_model_dir, adapters, compile_decode=True)

    def no_compiler(**kw):
        raise RuntimeError("InductorError: no working C++ compiler found")

    engine._compiled = no_compiler  # noqa: SLF001 - stands in for inductor failing
    with pytest.raises(RuntimeError, match=r"limits\.compile_decode: .*no working C\+\+ compiler"):
        engine.warm()
