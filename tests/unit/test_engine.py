"""The batched engine: requests that join mid-batch, each through its own adapter, generate exactly
what PEFT generates for that adapter alone (greedy, token for token)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from serving.engine import Engine, Overloaded, Request
from serving.lora_batch import MultiLoraModel
from tests.unit.test_lora_batch import _make_adapter


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("engine-adapters")
    return {
        "a": _make_adapter(tiny_model_dir, d / "a", 11, r=4, lora_alpha=16),
        "b": _make_adapter(
            tiny_model_dir, d / "b", 12, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]
        ),
        "dora": _make_adapter(tiny_model_dir, d / "d", 13, r=4, lora_alpha=16, use_dora=True),
    }


def _engine(tiny_model_dir, adapters, slots=4, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    multi = MultiLoraModel(base, slots=slots, r_max=8)
    return Engine(multi, tok, lambda name: adapters[name], **kw), tok


def _reference(tiny_model_dir, adapter_dir, prompt_ids, n):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return [t for t in out[0, len(prompt_ids) :].tolist() if t != tok.eos_token_id]


def _drain(engine, reqs, limit=500):
    for _ in range(limit):
        if all(r.finish_reason for r in reqs):
            return
        if not engine.step():
            time.sleep(0.01)  # every waiting request waits for its adapter's read (off this thread)
    raise AssertionError("requests did not finish")


def test_requests_joining_mid_batch_match_their_adapter_alone(tiny_model_dir, adapters):
    engine, tok = _engine(tiny_model_dir, adapters)
    prompts = [
        tok("hello there", add_special_tokens=False)["input_ids"],
        tok("a+b=", add_special_tokens=False)["input_ids"],
        tok("the quick brown fox", add_special_tokens=False)["input_ids"],
        tok("x", add_special_tokens=False)["input_ids"],
    ]
    first = [
        engine.submit(Request(prompts[0], "a", max_tokens=12)),
        engine.submit(Request(prompts[1], None, max_tokens=7)),
    ]
    for _ in range(3):
        engine.step()
    later = [
        engine.submit(Request(prompts[2], "dora", max_tokens=10)),
        engine.submit(Request(prompts[3], "b", max_tokens=9)),
    ]
    reqs = first + later
    _drain(engine, reqs)
    assert engine.stats["batch_rows"] > engine.stats["steps"], "rows were never batched together"
    for req, prompt in zip(reqs, prompts):
        ref = _reference(tiny_model_dir, adapters.get(req.adapter), prompt, req.max_tokens)
        assert req.out_ids == ref, (req.adapter, req.out_ids, ref)
        events = []
        while not req.events.empty():
            events.append(req.events.get())
        assert events[-1][0] == "done"
        assert "".join(t for k, t in events if k == "delta") == tok.decode(req.out_ids, skip_special_tokens=True)


def test_lru_slots_evict_and_reload(tiny_model_dir, adapters):
    engine, tok = _engine(tiny_model_dir, adapters, slots=2)  # one adapter slot
    p = tok("hi", add_special_tokens=False)["input_ids"]
    outs = {}
    for name in ["a", "b", "a"]:
        req = engine.submit(Request(p, name, max_tokens=5))
        _drain(engine, [req])
        outs.setdefault(name, []).append(req.out_ids)
    assert outs["a"][0] == outs["a"][1] == _reference(tiny_model_dir, adapters["a"], p, 5)
    assert engine.slots.stats.evictions == 2 and engine.cpu.stats.hits >= 1  # 'a' came back from the CPU tier


def test_waiting_requests_wait_for_a_free_slot(tiny_model_dir, adapters):
    engine, tok = _engine(tiny_model_dir, adapters, slots=2)
    p = tok("hi", add_special_tokens=False)["input_ids"]
    engine.add_adapter("a"), engine.add_adapter("b")  # both in the CPU tier: only the slot is missing
    ra, rb = engine.submit(Request(p, "a", max_tokens=6)), engine.submit(Request(p, "b", max_tokens=3))
    engine.step()
    assert [r.adapter for r in engine.running] == ["a"] and engine.waiting == [rb]  # the only slot is pinned
    _drain(engine, [ra, rb])
    assert rb.out_ids == _reference(tiny_model_dir, adapters["b"], p, 3)


def test_stop_strings_sampling_seed_and_overload(tiny_model_dir, adapters):
    engine, tok = _engine(tiny_model_dir, adapters, max_queue=2)
    p = tok("hello", add_special_tokens=False)["input_ids"]
    greedy = engine.submit(Request(p, "a", max_tokens=8))
    _drain(engine, [greedy])
    text = tok.decode(greedy.out_ids, skip_special_tokens=True)
    stop = text[3:5]
    req = engine.submit(Request(p, "a", max_tokens=8, stop=[stop]))
    _drain(engine, [req])
    streamed = []
    while not req.events.empty():
        streamed.append(req.events.get_nowait())
    assert req.finish_reason == "stop" and streamed[-1] == ("done", "stop")
    assert "".join(t for k, t in streamed if k == "delta") == text[: text.find(stop)]  # nothing past the stop string
    s1 = engine.submit(Request(p, "a", max_tokens=8, temperature=1.0, top_p=0.9, seed=7))
    s2 = engine.submit(Request(p, "a", max_tokens=8, temperature=1.0, top_p=0.9, seed=7))
    with pytest.raises(Overloaded):
        engine.submit(Request(p, None))
    _drain(engine, [s1, s2])
    assert s1.out_ids == s2.out_ids


def test_corrupt_adapter_fails_only_its_requests(tiny_model_dir, adapters, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapters["a"] / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"garbage")
    engine, tok = _engine(tiny_model_dir, {**adapters, "broken": broken})
    p = tok("hi", add_special_tokens=False)["input_ids"]
    bad, good = engine.submit(Request(p, "broken", max_tokens=4)), engine.submit(Request(p, "a", max_tokens=4))
    _drain(engine, [good])
    kind, msg = bad.events.get_nowait()
    assert kind == "adapter_error" and "'broken' could not be loaded" in msg
    assert good.out_ids == _reference(tiny_model_dir, adapters["a"], p, 4)


def _events(req, timeout=60.0):
    """Every event of ``req`` up to its final one, as the HTTP layer reads them."""
    import queue

    out = []
    while not out or out[-1][0] not in ("done", "error", "adapter_error"):
        try:
            out.append(req.events.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"request {req.id} got no final event: {out}") from None
    return out


def test_a_failing_step_fails_only_its_requests_and_the_loop_goes_on(tiny_model_dir, adapters):
    engine, tok = _engine(tiny_model_dir, adapters)
    mlp = engine.model.model.layers[0].mlp
    forward, broken = mlp.forward, threading.Event()

    def flaky(*args, **kwargs):
        if broken.is_set():
            broken.clear()
            raise RuntimeError("injected fault")
        return forward(*args, **kwargs)

    mlp.forward = flaky
    engine.start()
    try:
        p = tok("hello", add_special_tokens=False)["input_ids"]
        victim = engine.submit(Request(p, "a", max_tokens=400, ignore_eos=True))
        while len(victim.out_ids) < 3:
            time.sleep(0.005)
        broken.set()
        events = _events(victim)
        assert events[-1] == ("error", "generation failed: RuntimeError: injected fault")
        assert engine.alive() and engine.stats["failed_steps"] == 1
        after = engine.submit(Request(p, "a", max_tokens=6))
        assert _events(after)[-1][0] == "done"
        assert after.out_ids == _reference(tiny_model_dir, adapters["a"], p, 6)
        assert not engine.slots.pins.get("a")  # the victim's pin was dropped
    finally:
        engine.stop()


def test_a_row_waits_only_for_its_own_adapters_read(tiny_model_dir, adapters):
    gate = threading.Event()

    def resolve(name):
        if name == "slow":
            assert gate.wait(60), "the gate never opened"
        return adapters["b" if name == "slow" else name]

    engine, tok = _engine(tiny_model_dir, adapters)
    engine.resolve = resolve
    engine.start()
    try:
        p = tok("hi", add_special_tokens=False)["input_ids"]
        slow = engine.submit(Request(p, "slow", max_tokens=4))
        fast = engine.submit(Request(p, "a", max_tokens=4))
        assert _events(fast)[-1][0] == "done"  # while 'slow' is still being read
        assert slow.finish_reason is None and not slow.out_ids
        gate.set()
        assert _events(slow)[-1][0] == "done"
        assert slow.out_ids == _reference(tiny_model_dir, adapters["b"], p, 4)
    finally:
        engine.stop()


def test_supports_names_why_an_adapter_cannot_be_served(tiny_model_dir, adapters, tmp_path):
    import json
    import shutil

    engine, _ = _engine(tiny_model_dir, adapters)
    assert engine.supports(adapters["a"]) is None and engine.supports(adapters["dora"]) is None
    cases = {
        "ia3": ({"peft_type": "IA3"}, "peft_type 'IA3' is not served"),
        "big": ({"r": 64}, "rank 64 exceeds the served maximum rank 8"),
        "pattern": ({"rank_pattern": {"q_proj": 16}}, "rank 16 exceeds"),
    }
    for name, (change, reason) in cases.items():
        d = shutil.copytree(adapters["a"], tmp_path / name)
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        assert reason in engine.supports(d), name
    pickled = shutil.copytree(adapters["a"], tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    assert "pickled .bin adapters are refused" in engine.supports(pickled)
    assert "no readable adapter_config.json" in engine.supports(tmp_path)
