"""The chunked loss: the same summed loss and gradients as the model's own loss, for every kind of method,
with no vocab-sized tensor larger than one chunk. No Ray."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipelines.model import methods
from pipelines.train import label_tokens, token_loss_sum
from tests.unit.test_methods import GALORE, _setup

CASES = {
    "lora": {},
    "dora": {},
    "qlora": {},
    "galore": GALORE,
    "ia3": {},
    "prompt_tuning": {"args": {"num_virtual_tokens": 8}},
    "prefix_tuning": {"args": {"num_virtual_tokens": 8}},
}


class _VocabRows(TorchDispatchMode):
    """Records the rows of every new tensor (not a view: the head's weight is viewed as ``[hidden, vocab]``) an
    op returns whose last dimension is the vocabulary."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                self.rows.append(t.numel() // self.vocab)
        return out


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_chunked_loss_equals_the_models_own_loss_and_gradients(tiny_model_dir, chat_data, name):
    spec, base, _, batch = _setup(tiny_model_dir, chat_data, name, CASES[name], 0.01)
    prepared = methods.build(spec, base)
    model = prepared.model
    model.eval()  # no dropout: every path sees the same function
    n = label_tokens(batch["labels"])
    assert 0 < n < batch["labels"].numel() / 2  # chat data: most positions are prompt or padding
    # one optimizer step first, so no adapter sits at its zero init (where some gradients vanish)
    model(**batch).loss.backward()
    if not prepared.steps_in_backward:
        prepared.optimizer.step()
    prepared.optimizer.zero_grad(set_to_none=True)

    reference = model(**batch).loss * n  # transformers' mean over the counted tokens, as a sum
    reference.backward()
    ref_grads = _grads(model)
    assert ref_grads
    for chunk in (0, 5, 1024):
        total = token_loss_sum(model, model, batch, chunk)
        torch.testing.assert_close(total, reference.detach(), rtol=1e-5, atol=1e-5)
        total.backward()
        grads = _grads(model)
        assert grads.keys() == ref_grads.keys()
        for k in grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6, msg=f"{name} chunk {chunk}: {k}")


def test_no_vocab_sized_tensor_outgrows_a_chunk(tiny_model_dir, chat_data):
    spec, base, _, batch = _setup(tiny_model_dir, chat_data, "lora", {}, 0.01)
    model = methods.build(spec, base).model
    vocab = model.config.vocab_size
    tokens, rows = batch["input_ids"].numel(), batch["input_ids"].shape[0]
    with _VocabRows(vocab) as full:
        token_loss_sum(model, model, batch, 0).backward()
    assert max(full.rows) >= tokens - rows  # the test sees the full logits when they exist
    with _VocabRows(vocab) as chunked:
        token_loss_sum(model, model, batch, 5).backward()
    assert max(chunked.rows) <= max(5, rows), chunked.rows  # one chunk, or the head's one position per row


def test_fixed_chunk_count_pads_with_empty_chunks(tiny_model_dir, chat_data):
    """ZeRO-3's lockstep: more chunks than the rows need, with or without recomputation, changes nothing."""
    spec, base, _, batch = _setup(tiny_model_dir, chat_data, "lora", {}, 0.01)
    model = methods.build(spec, base).model
    model.eval()
    a = token_loss_sum(model, model, batch, 8)
    a.backward()
    ref = _grads(model)
    chunks = label_tokens(batch["labels"]) // 8 + 3
    for recompute in (True, False):  # False: ZeRO-3 keeps the chunks' logits instead of recomputing them
        b = token_loss_sum(model, model, batch, 8, chunks=chunks, recompute=recompute)
        torch.testing.assert_close(a, b)
        b.backward()
        for k, g in _grads(model).items():
            torch.testing.assert_close(g, ref[k], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_one_smollm2_step_matches_the_models_own_loss():
    """The real base (49,152-token vocabulary, tied head): loss and LoRA gradients of one step agree."""
    from pipelines import data as D
    from pipelines.model import load_base
    from pipelines.spec import validate

    spec = validate(
        {
            "model": {"base": "smollm2-135m", "dtype": "float32"},
            "method": {"name": "lora", "r": 8, "dropout": 0.0},
            "data": {"train": "builtin:json_extract", "format": "chat", "max_length": 160},
        }
    )
    torch.manual_seed(0)
    base, tok, _ = load_base(spec)
    prepared = methods.build(spec, base)
    model = prepared.model
    train, _ = D.train_eval_records(spec.data, spec.train.seed)
    batch = D.collate(D.encode_all(train[:4], spec.data, tok), tok.pad_token_id)
    model(**batch).loss.backward()
    prepared.optimizer.step()
    prepared.optimizer.zero_grad(set_to_none=True)
    n = label_tokens(batch["labels"])
    reference = model(**batch).loss * n
    reference.backward()
    ref_grads = _grads(model)
    total = token_loss_sum(model, model, batch, 1024)
    torch.testing.assert_close(total, reference.detach(), rtol=1e-5, atol=1e-4)
    total.backward()
    grads = _grads(model)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6, msg=k)


def test_the_engine_keeps_adaloras_orthogonal_regularization(tiny_model_dir, chat_data):
    """AdaLoRA's model adds its regularizer to ``outputs.loss`` only when given labels; the engine adds it
    itself, so its step has the gradients of the model's own loss."""
    from pipelines.train import build_engine

    spec, base, _, batch = _setup(tiny_model_dir, chat_data, "adalora", {}, 0.01)
    prepared = methods.build(spec, base)
    model = prepared.model
    model.eval()
    assert float(prepared.regularizer()) > 0
    model(**batch).loss.backward()  # includes the regularizer
    ref = _grads(model)
    engine = build_engine(spec, prepared, 0, 1, torch.device("cpu"), None)
    total = engine.micro_step(batch, True, label_tokens(batch["labels"]))
    got = _grads(model)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    assert float(total) > 0


@pytest.mark.parametrize("share_prefix", [False, True], ids=["packed", "shared-prefix"])
@pytest.mark.parametrize("chunk", [0, 16], ids=["full-loss", "chunked-loss"])
def test_a_micro_step_reads_nothing_back_from_the_device(tiny_model_dir, tmp_path, share_prefix, chunk):
    """Forward, loss and backward of a padding-free micro-batch (packed examples, and a shared prefix) make
    no device-to-host sync: the row layout and the counted positions come from the host batch
    (``train.attention.device_batch``), and the global token count stays a device tensor. The loss is read on
    logging steps only. On a GPU each such read would stall the host until the device caught up."""
    from pipelines import data as D
    from pipelines.model import load_base
    from pipelines.train import batch_layout, build_engine
    from pipelines.train.attention import device_batch
    from pipelines.train.loop import accumulate
    from tests.conftest import tiny_spec, write_chat_data
    from tests.syncs import count_syncs

    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    spec = tiny_spec(
        tiny_model_dir,
        data,
        method={"name": "lora", "r": 4, "dropout": 0.0},
        train={"loss_chunk_tokens": chunk},
    )
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"share_prefix": share_prefix})})
    torch.manual_seed(0)
    base, tok, _ = load_base(spec)
    prepared = methods.build(spec, base)
    cpu = torch.device("cpu")
    engine = build_engine(spec, prepared, 0, 1, cpu, None)
    layout = batch_layout(spec, prepared.model, cpu)
    assert layout.padding_free and layout.share_prefix == share_prefix
    assert layout.varlen  # per-example attention: the layout is handed over, not read back
    examples = D.encode_all(D.load_records(str(data)), spec.data, tok)
    batches = [D.collate(examples[i : i + 4], tok.pad_token_id, True, share_prefix) for i in (0, 4)]
    before, _ = accumulate(
        engine, batches, 1, cpu, layout.varlen
    )  # warm: the first call may read what later ones cache
    tokens = torch.tensor(float(sum(label_tokens(b["labels"]) for b in batches)))
    inputs = [device_batch(b, cpu, varlen=True) for b in batches]  # host work: reads host tensors only
    with count_syncs() as syncs:
        total = sum(engine.micro_step(x, i == 1, tokens) for i, x in enumerate(inputs))
    assert not syncs, dict(syncs)
    torch.testing.assert_close(total, before)  # the same loss as accumulate's, which took the same path
