"""``train.attention: flex`` on a real GPU (``gpu``: skipped without CUDA): the compiled FlexAttention
backward that a CPU cannot run, against the padded batch, and a micro-step that makes no host sync."""

from __future__ import annotations

import random

import pytest
import torch

from pipelines.train import attention
from pipelines.train.attention import device_batch
from tests.unit.test_flex import LAYOUTS, _loss_and_grads, _model, _row, tok  # noqa: F401 - the fixture

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_flex_on_cuda_gives_the_padded_batch_loss_and_gradients(tiny_model_dir, tok, layout):  # noqa: F811
    """fp32, compiled FlexAttention forward and backward: the padded batch's loss and gradients (1e-4: the
    kernels accumulate in another order than SDPA's)."""
    row, padded = _row(tok, *LAYOUTS[layout])
    loss, grads = _loss_and_grads(_model(tiny_model_dir, attention.FLEX, "cuda"), device_batch(row, "cuda", flex=True))
    want_loss, want_grads = _loss_and_grads(
        _model(tiny_model_dir, device="cuda"), {k: v.cuda() for k, v in padded.items()}
    )
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads, want_grads, rtol=1e-4, atol=1e-4)


def test_a_flex_micro_step_on_cuda_syncs_nothing_and_compiles_per_bucket_at_most(tiny_model_dir, tok):  # noqa: F811
    """20 micro-batches of 2-8 examples: forward and backward raise under ``set_sync_debug_mode("error")`` if
    anything waits for the device (the host batch is moved before, as ``loop.accumulate`` does), and
    FlexAttention compiles at most once per 128-token bucket."""
    from torch._dynamo.utils import counters

    model = _model(tiny_model_dir, attention.FLEX, "cuda")
    torch._dynamo.reset()
    before, lengths, seen, checked = counters["stats"]["unique_graphs"], set(), set(), 0
    for step in range(20):
        row, _ = _row(tok, False, True, seed=step, n=random.Random(step).randint(2, 8))
        lengths.add(row["input_ids"].shape[1])
        inputs = {k: v for k, v in device_batch(row, "cuda", flex=True).items() if k != "counted_index"}
        torch.cuda.synchronize()
        if inputs["input_ids"].shape[1] in seen:  # compiled already (compiling may wait for the device)
            torch.cuda.set_sync_debug_mode("error")
            checked += 1
        seen.add(inputs["input_ids"].shape[1])
        try:
            model(**inputs).loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert checked >= 10, checked
    assert 1 <= counters["stats"]["unique_graphs"] - before <= len({-(-n // 128) for n in lengths})
