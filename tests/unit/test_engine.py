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


def test_rows_join_while_a_long_prompt_is_prefilled_in_chunks(tiny_model_dir, adapters):
    """A 40-token prompt goes in chunks of 4 tokens per step; a decoding row emits a token every step
    meanwhile, a request joins mid-prefill, and every row still equals its adapter alone."""
    engine, tok = _engine(tiny_model_dir, adapters, prefill_chunk_tokens=4)
    for name in ("a", "b", "dora"):
        engine.add_adapter(name)
    short = tok("hi", add_special_tokens=False)["input_ids"]
    long = (tok("the quick brown fox jumps over the lazy dog ", add_special_tokens=False)["input_ids"] * 5)[:40]
    runner = engine.submit(Request(short, "a", max_tokens=30, ignore_eos=True))
    while not runner.out_ids:
        engine.step()
    slow = engine.submit(Request(long, "dora", max_tokens=6))
    grew = []
    for i in range(6):
        before = len(runner.out_ids)
        engine.step()
        grew.append(len(runner.out_ids) - before)
        if i == 2:
            joiner = engine.submit(Request(short[:1], "b", max_tokens=5))
    assert grew == [1] * 6, "the decoding row stalled while the long prompt was prefilled"
    assert slow.state.fed < len(long) and not slow.out_ids  # still prefilling, 4 tokens a step
    _drain(engine, [runner, slow, joiner])
    assert slow.out_ids == _reference(tiny_model_dir, adapters["dora"], long, 6)
    assert joiner.out_ids == _reference(tiny_model_dir, adapters["b"], short[:1], 5)
    ref = _reference(tiny_model_dir, adapters["a"], short, 30)
    assert runner.out_ids[: len(ref)] == ref  # ignore_eos: the reference stops at its EOS


def test_joins_and_leaves_never_copy_the_whole_cache(tiny_model_dir, adapters):
    from torch.utils._python_dispatch import TorchDispatchMode

    engine, tok = _engine(tiny_model_dir, adapters, max_batch=4)
    p = tok("hello there", add_special_tokens=False)["input_ids"]
    first = [engine.submit(Request(p, None, max_tokens=n, ignore_eos=True)) for n in (3, 20, 20, 20)]
    engine.step()
    buffer = engine.kv.keys[0]
    ptr, whole = buffer.data_ptr(), buffer.numel()
    biggest = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.cat.default, torch.ops.aten.index_select.default, torch.ops.aten.copy_.default):
                biggest.append(out.numel())
            return out

    with Copies():
        for _ in range(4):  # the first request leaves; another joins its row
            engine.step()
        late = engine.submit(Request(p, None, max_tokens=4))
        _drain(engine, [*first, late])
    assert engine.kv.keys[0].data_ptr() == ptr  # the buffers were never reallocated
    assert max(biggest) <= whole // 4, "a copy as large as the cache of several rows"


def test_kv_cap_admits_what_fits_and_refuses_what_never_can(tiny_model_dir, adapters):
    from serving.engine import TooLarge

    engine, tok = _engine(tiny_model_dir, adapters, max_batch=4, max_context=256)
    per_token = engine.kv.bytes_per_token
    engine.max_kv_bytes = 2 * 65 * per_token  # two rows of 64 tokens
    p = tok("hi", add_special_tokens=False)["input_ids"]
    with pytest.raises(TooLarge, match="limits.max_kv_bytes"):
        engine.submit(Request(p, None, max_tokens=200))  # 202 tokens: more than the cap holds in one row
    with pytest.raises(TooLarge, match="holds 256 per row"):
        engine.submit(Request(p, None, max_tokens=300))
    reqs = [engine.submit(Request(p, None, max_tokens=50, ignore_eos=True)) for _ in range(3)]  # 52 tokens each
    engine.step()
    assert engine.running == reqs[:2] and engine.waiting == reqs[2:]  # a third row would pass the cap
    assert engine.kv.nbytes() <= engine.max_kv_bytes
    _drain(engine, reqs)
    assert [len(r.out_ids) for r in reqs] == [50, 50, 50]


@pytest.mark.parametrize("family", ["mistral", "qwen2-mixed"])
def test_sliding_window_models_match_generate(tmp_path, family):
    """Masks for sliding-window layers: every layer (Mistral) or some of them (layer_types)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, Qwen2Config

    from pipelines.model import tiny_llama

    tok_dir = tiny_llama(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    small |= {"num_hidden_layers": 2, "vocab_size": tok.vocab_size, "sliding_window": 4}
    if family == "mistral":
        cfg = MistralConfig(**small)
    else:
        cfg = Qwen2Config(**small, use_sliding_window=True, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    prompt = tok("the quick brown fox jumps over", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt])
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    later = tok("a lazy dog sleeps all day long in the sun", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([later])
    ref2 = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    engine = Engine(MultiLoraModel(model, slots=2, r_max=4), tok, lambda name: name, prefill_chunk_tokens=3)
    req = engine.submit(Request(prompt, None, max_tokens=8, ignore_eos=True))
    while len(req.out_ids) < 2:
        engine.step()
    req2 = engine.submit(Request(later, None, max_tokens=6, ignore_eos=True))  # chunks of 3 beside a decoding row
    _drain(engine, [req, req2])
    assert req.out_ids == ref[0, len(prompt) :].tolist()
    assert req2.out_ids == ref2[0, len(later) :].tolist()


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "gather-and-segments"])
def test_a_step_is_one_forward_pass_with_the_decoding_rows_and_the_prompt_chunk(
    tiny_model_dir, adapters, monkeypatch, in_place
):
    """Decode tokens and a prompt's chunk share one pass over the weights, end to end, with no padding; the
    same outputs whether the adapters are read in place or gathered per row with a chunk per segment."""
    from serving import lora_batch

    if not in_place:
        monkeypatch.setattr(lora_batch, "IN_PLACE_TOKEN_SLOTS", 0)
    engine, tok = _engine(tiny_model_dir, adapters, prefill_chunk_tokens=5, prefill_slowdown=None)
    engine.add_adapter("a")
    engine.add_adapter("dora")
    short = tok("hi there", add_special_tokens=False)["input_ids"]
    long = (tok("the quick brown fox jumps over the lazy dog ", add_special_tokens=False)["input_ids"] * 3)[:23]
    runners = [engine.submit(Request(short, name, max_tokens=20, ignore_eos=True)) for name in ("a", None)]
    while not all(r.out_ids for r in runners):
        engine.step()
    shapes = []
    hook = engine.model.register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    slow = engine.submit(Request(long, "dora", max_tokens=4))
    for _ in range(5):
        engine.step()
    hook.remove()
    assert shapes == [(1, 2 + 5)] * 4 + [(1, 2 + 3)]  # one pass a step: 2 decode tokens + the chunk (5, 5, 5, 5, 3)
    assert len(slow.out_ids) == 1
    plain = engine.submit(Request(long[:7], None, max_tokens=3))  # a bare-base chunk beside adapter rows
    _drain(engine, [*runners, slow, plain])
    assert slow.out_ids == _reference(tiny_model_dir, adapters["dora"], long, 4)
    assert plain.out_ids == _reference(tiny_model_dir, None, long[:7], 3)
    assert runners[0].out_ids[:5] == _reference(tiny_model_dir, adapters["a"], short, 20)[:5]


def test_logprobs_are_the_adapters_own_distribution(tiny_model_dir, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine, tok = _engine(tiny_model_dir, adapters)
    p = tok("hello there", add_special_tokens=False)["input_ids"]
    asked = engine.submit(Request(p, "dora", max_tokens=6, logprobs=3, ignore_eos=True))
    plain = engine.submit(Request(p, "a", max_tokens=6, ignore_eos=True))
    _drain(engine, [asked, plain])
    events = [asked.events.get_nowait() for _ in range(asked.events.qsize())]
    entries = [e for kind, value in events if kind == "logprobs" for e in value]
    assert [t for t, _, _ in entries] == asked.out_ids  # one entry per generated token, in order
    assert not any(kind == "logprobs" for kind, _ in [plain.events.get_nowait() for _ in range(plain.events.qsize())])

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapters["dora"]).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + asked.out_ids])).logits[0, len(p) - 1 : -1]
    ref = torch.log_softmax(logits.float(), -1)
    for row, (token, lp, top) in zip(ref, entries):
        assert abs(lp - row[token].item()) < 1e-4
        assert [a for a, _ in top] == row.topk(3).indices.tolist()
        assert top[0][0] == token  # greedy: the chosen token is the most likely one


def test_a_cancelled_request_frees_its_row_mid_decode_and_mid_prefill(tiny_model_dir, adapters):
    """What the HTTP layer does when a client disconnects: the row goes at the next step, and the rows
    beside it carry on unchanged."""
    engine, tok = _engine(tiny_model_dir, adapters, prefill_chunk_tokens=4)
    engine.add_adapter("a")
    p = tok("hello there", add_special_tokens=False)["input_ids"]
    long = (tok("the quick brown fox ", add_special_tokens=False)["input_ids"] * 8)[:32]
    keep = engine.submit(Request(p, "a", max_tokens=10))
    gone = engine.submit(Request(p, None, max_tokens=50, ignore_eos=True))
    while len(gone.out_ids) < 3:
        engine.step()
    engine.cancel(gone)
    prefilling = engine.submit(Request(long, None, max_tokens=5))
    engine.step()
    assert gone not in engine.rows and engine.n == 1 and engine.prefilling == [prefilling]
    engine.cancel(prefilling)
    engine.step()
    assert engine.rows == [keep] and engine.slots.pins.get("a") == 1
    _drain(engine, [keep])
    assert keep.out_ids == _reference(tiny_model_dir, adapters["a"], p, 10)
    assert len(gone.out_ids) < 50 and gone.finish_reason == "cancelled"


def test_the_loop_thread_finishes_prompts_that_take_several_steps_with_no_row_decoding(tiny_model_dir, adapters):
    """The loop sleeps only when nothing waits and no row runs, prefilling rows included (a prompt fed in
    chunks while no row decodes once hung until the next request arrived)."""
    engine, tok = _engine(tiny_model_dir, adapters, prefill_chunk_tokens=2)
    engine.start()
    try:
        long = (tok("the quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"] * 2)[:11]
        req = engine.submit(Request(long, "a", max_tokens=3, ignore_eos=True))
        deadline = time.time() + 30
        while req.finish_reason is None and time.time() < deadline:
            time.sleep(0.05)
        assert req.finish_reason == "length", "the prefilling row was left waiting"
        ref = _reference(tiny_model_dir, adapters["a"], long, 3)
        assert len(req.out_ids) == 3 and req.out_ids[: len(ref)] == ref  # ignore_eos: the reference stops at EOS
    finally:
        engine.stop()


def test_a_step_reads_the_device_once_whatever_its_rows_do(tiny_model_dir, adapters):
    """Greedy, sampled, logprob and stop-string rows decoding while a long prompt is prefilled in chunks
    and then joins them: every step makes one device-to-host read (the sampled tokens, with the logprobs),
    none in the forward pass, the sampling, the stop checks or the chunk budget (tests/syncs.py)."""
    from tests.syncs import count_syncs

    engine, tok = _engine(tiny_model_dir, adapters, prefill_chunk_tokens=8)
    for name in ("a", "b"):
        engine.add_adapter(name)
    p = tok("hello there", add_special_tokens=False)["input_ids"]
    long = tok("a longer prompt, prefilled in chunks of a few tokens each " * 2, add_special_tokens=False)["input_ids"]
    reqs = [
        engine.submit(Request(p, "a", max_tokens=40, ignore_eos=True)),
        engine.submit(Request(p, "b", max_tokens=40, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True)),
        engine.submit(Request(p, None, max_tokens=40, logprobs=2, stop=["zz"], ignore_eos=True)),
    ]
    while engine.n < 3:
        engine.step()
    reqs.append(engine.submit(Request(long, "a", max_tokens=4, ignore_eos=True)))
    joined_beside_decoding = 0
    for _ in range(120):
        if all(r.finish_reason for r in reqs):
            break
        n = engine.n
        with count_syncs() as syncs:
            engine.step()
        joined_beside_decoding += bool(n) and engine.n > n
        sampled = n > 0 or engine.n > n or any(r.finish_reason for r in reqs[3:])
        assert dict(syncs) == ({"tolist": 1} if sampled else {}), dict(syncs)
    assert all(r.finish_reason == "length" for r in reqs), [r.finish_reason for r in reqs]
    assert joined_beside_decoding, "no prompt finished beside decoding rows"
    assert len(reqs[2].out_ids) == 40 and all(r.out_ids for r in reqs)


def test_a_seeded_request_draws_the_same_tokens_alone_and_in_any_batch(tiny_model_dir, adapters):
    engine, tok = _engine(tiny_model_dir, adapters)
    p = tok("hello", add_special_tokens=False)["input_ids"]

    def sampled(**kw):
        return Request(p, "a", max_tokens=8, temperature=1.2, top_p=0.95, ignore_eos=True, **kw)

    alone = engine.submit(sampled(seed=11))
    _drain(engine, [alone])
    others = [engine.submit(Request(p, name, max_tokens=8, ignore_eos=True)) for name in ("b", None)]
    crowd = engine.submit(sampled(seed=11))  # the third row, beside other adapters
    different = engine.submit(sampled(seed=12))
    _drain(engine, [*others, crowd, different])
    assert crowd.out_ids == alone.out_ids
    assert different.out_ids != alone.out_ids
