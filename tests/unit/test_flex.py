"""``train.attention: flex``: one FlexAttention call per layer for a padding-free row, over a block mask built
once per micro-batch from ``collate``'s layout (``attention.flex_mask``).

PyTorch has no FlexAttention backward on a CPU, so gradients are checked here through the *same rule*
(``attention.flex_rule``) applied densely (``create_mask``) by SDPA, and the compiled FlexAttention forward is
checked against that dense run; ``test_flex_cuda.py`` (``gpu``) runs the compiled backward itself.

Inductor's CPU FlexAttention template fails to compile with dynamic shapes (torch 2.13: ``cur_qSplitSize8 was
not declared``), which dynamo switches to on a second row length; the forward checks here therefore compile
with static shapes, once per 128-token bucket. (Flex never trains on a CPU: the spec refuses it there.)
"""

from __future__ import annotations

import random

import pytest
import torch

from pipelines import data as D
from pipelines.train import attention
from pipelines.train.attention import device_batch
from tests.unit.test_prepare import _instructed

LAYOUTS = {"packed": (True, False), "shared-prefix": (False, True), "packed+shared-prefix": (True, True)}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from pipelines.model import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def _row(tok, packed: bool, share: bool, seed: int = 0, n: int = 5):
    r = random.Random(seed)
    exs = [D.encode(_instructed(r.randint(1, 40)), "chat", tok, 96) for _ in range(n)]
    rows = D.pack(exs, 128) if packed else exs
    return D.collate(rows, tok.pad_token_id, padding_free=True, share_prefix=share), D.collate(exs, tok.pad_token_id)


def _model(tiny_model_dir, implementation=None, device="cpu"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).to(device)
    if implementation:
        assert attention.enable(model, implementation)
    return model


def _dense(inputs: dict, mask_mod=None) -> dict:
    """``device_batch``'s flex inputs with their BlockMask's rule (or a planted ``mask_mod``) applied densely:
    a ``[1, 1, n, n]`` boolean mask that stock SDPA takes as it is."""
    from torch.nn.attention.flex_attention import create_mask

    n = inputs["input_ids"].shape[1]
    mask = create_mask(mask_mod or inputs["attention_mask"].mask_mod, None, None, n, n, device="cpu")
    return {**{k: v for k, v in inputs.items() if k != "counted_index"}, "attention_mask": mask}


def _loss_and_grads(model, inputs):
    loss = model(**{k: v for k, v in inputs.items() if k != "counted_index"}).loss
    loss.backward()
    return loss.detach(), torch.cat([w.grad.flatten() for w in model.parameters() if w.grad is not None])


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_the_flex_rule_gives_the_padded_batch_loss_and_gradients(tiny_model_dir, tok, layout):
    """The row padded to its bucket, under the rule its BlockMask carries: the padded batch's loss and every
    gradient (1e-5). A rule that lets one example see another gives a different loss, so the check can fail."""
    row, padded = _row(tok, *LAYOUTS[layout])
    inputs = device_batch(row, "cpu", flex=True)
    n = row["input_ids"].shape[1]
    assert inputs["input_ids"].shape[1] == attention.flex_length(n) > n  # padded to a multiple of 128
    assert inputs["attention_mask"].shape == (1, 1, attention.flex_length(n), attention.flex_length(n))
    want_loss, want_grads = _loss_and_grads(_model(tiny_model_dir), padded)
    loss, grads = _loss_and_grads(_model(tiny_model_dir), _dense(inputs))
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads, want_grads, rtol=1e-5, atol=1e-5)

    def leaky(b, h, q, kv):  # planted: plain causal over the row, every example sees the ones before it
        return kv <= q

    assert not torch.allclose(_loss_and_grads(_model(tiny_model_dir), _dense(inputs, leaky))[0], want_loss, atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_compiled_flex_attention_runs_the_rule_and_reads_nothing_back(tiny_model_dir, tok, layout):
    """The model on ``FLEX`` (transformers' compiled ``flex_attention`` with the row's BlockMask) gives the
    logits of the same rule applied densely (1e-5), and its forward makes no device-to-host sync (counted with
    the kernel run eagerly: a dispatch mode cannot look inside a compiled one)."""
    from tests.syncs import count_syncs

    row, _ = _row(tok, *LAYOUTS[layout])
    inputs = device_batch(row, "cpu", flex=True)
    model = _model(tiny_model_dir, attention.FLEX).eval()
    forward = {k: v for k, v in inputs.items() if k not in ("labels", "counted_index")}
    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        flex = model(**forward).logits
        want = _model(tiny_model_dir).eval()(**{k: v for k, v in _dense(inputs).items() if k != "labels"}).logits
        with torch.compiler.set_stance("force_eager"), count_syncs() as syncs:
            model(**forward)
    assert dict(syncs) == {}
    real = row["input_ids"].shape[1]  # the bucket's padding is never counted
    torch.testing.assert_close(flex[:, :real], want[:, :real], rtol=1e-5, atol=1e-5)


def test_flex_compiles_once_per_bucket_not_once_per_step(tiny_model_dir, tok):
    """20 micro-batches of 2-8 examples (every row length different) compile FlexAttention at most once per
    128-token bucket they fall in; without the padding to a bucket they would compile once per length."""
    from torch._dynamo.utils import counters

    model = _model(tiny_model_dir, attention.FLEX).eval()
    lengths, buckets = set(), set()
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        for step in range(20):
            row, _ = _row(tok, False, True, seed=step, n=random.Random(step).randint(2, 8))
            lengths.add(row["input_ids"].shape[1])
            inputs = device_batch(row, "cpu", flex=True)
            buckets.add(inputs["input_ids"].shape[1])
            model(**{k: v for k, v in inputs.items() if k not in ("labels", "counted_index")})
    compiled = counters["stats"]["unique_graphs"] - before
    assert len(lengths) >= 10, lengths
    assert 1 <= compiled <= len({-(-n // 128) for n in lengths}), (compiled, lengths)


def test_the_mask_layout_is_read_off_the_host_row():
    """``example_ids``: each position's example and the shared prefix's length, from ``collate``'s positions;
    the bucket's pads each form an example of their own, so they attend to nothing real."""
    assert attention.example_ids([0, 1, 2, 0, 1, 0, 1, 2, 3]) == ([0, 0, 0, 1, 1, 2, 2, 2, 2], 0)
    assert attention.example_ids([0, 1, 2, 3, 2, 3, 4, 2]) == ([0, 0, 0, 0, 1, 1, 1, 2], 2)
    assert [attention.flex_length(n) for n in (1, 128, 129, 300)] == [128, 128, 256, 384]
    mask = attention.flex_mask(torch.tensor([[0, 1, 2, 3, 2, 3]]), "cpu")
    dense = _dense({"input_ids": torch.zeros(1, 128, dtype=torch.long), "attention_mask": mask})["attention_mask"]
    assert dense[0, 0, :6, :6].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # the second example: the 2-token prefix, then itself
        [1, 1, 0, 0, 1, 1],
    ]
    assert not dense[0, 0, 6:, 2:6].any() and not dense[0, 0, :6, 6:].any()  # pads see no example's own tokens
    assert dense[0, 0, 6:, 6:].equal(torch.eye(122, dtype=torch.bool))  # and only themselves among the pads


def test_train_attention_takes_the_path_it_names_and_refuses_what_cannot_run(tiny_model_dir, chat_data):
    """``auto`` keeps per-example SDPA on a CPU and pads on a GPU (the measured defaults); ``per_example`` and
    ``flex`` get padding-free rows with that attention on any device they can run on, recorded as
    ``Layout.attention``; ``flex`` without a GPU, or with a method that needs padded rows, is refused naming
    ``train.attention``."""
    from transformers import AutoModelForCausalLM

    from pipelines.model import methods
    from pipelines.spec import SpecError, validate
    from tests.conftest import tiny_spec

    def layout(attention_: str, device: str, gpu: bool = False, method: dict | None = None):
        raw = tiny_spec(tiny_model_dir, chat_data).model_dump(mode="json", exclude_unset=True)
        raw["method"] = method or {**raw["method"], "dropout": 0.0}
        spec = validate({**raw, "train": {**raw["train"], "attention": attention_}, "scaling": {"use_gpu": gpu}})
        torch.manual_seed(0)
        model = methods.build(spec, AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))).model
        return attention.batch_layout(spec, model, torch.device(device))

    assert layout("auto", "cpu").attention == "per_example"
    assert layout("auto", "cuda", gpu=True).attention == "padded"
    on_gpu = layout("per_example", "cuda", gpu=True)
    assert (on_gpu.attention, on_gpu.padding_free, on_gpu.share_prefix) == ("per_example", True, True)
    flex = layout("flex", "cuda", gpu=True)
    assert (flex.attention, flex.padding_free, flex.share_prefix, flex.varlen) == ("flex", True, True, False)
    assert flex.how.startswith("padding-free rows; one FlexAttention call per layer (raypeft_flex")
    with pytest.raises(SpecError) as e:
        layout("flex", "cpu")
    assert [f for f, _ in e.value.problems] == ["train.attention"] and "(got 'flex')" in e.value.problems[0][1]
    with pytest.raises(ValueError, match=r"train.attention: flex needs padding-free rows .* virtual tokens"):
        layout("flex", "cuda", gpu=True, method={"name": "prompt_tuning", "args": {"num_virtual_tokens": 4}})
