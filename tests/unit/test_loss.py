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
