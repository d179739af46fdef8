"""Phase 1 of the layerwise search: how much each decoder layer minds quantization, and how much it wants rank.

* sensitivity[bits][i]: the KL divergence (nats per completion token) between the full-precision model's
  next-token distribution and the model with only layer ``i``'s linears round-tripped through ``bits``
  (bnb NF4, or LLM.int8's row-wise absmax int8), on a small calibration set;
* importance[i]: the squared gradient norm of the loss w.r.t. layer ``i``'s target linears (a Fisher
  estimate of how much adapting that layer can move the loss), normalized to sum to 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.spec import JobSpec


def fake_quant(w, bits: int):
    """``w`` after a quantize → dequantize round trip at ``bits`` (4: bnb NF4, blocksize 64; 8: row-wise int8)."""
    import torch

    if bits == 4:
        import bitsandbytes.functional as F

        q, state = F.quantize_4bit(w.float().contiguous(), blocksize=64, quant_type="nf4")
        return F.dequantize_4bit(q, state).to(w.dtype)
    scale = w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return (torch.round(w.float() / scale).clamp(-127, 127) * scale).to(w.dtype)


def calibrate(
    spec: JobSpec, bits: Sequence[int], targets: Sequence[str], samples: int = 16, threads: int | None = None, log=print
) -> dict[str, Any]:
    """Sensitivity and importance per decoder layer of the spec's base (loaded unquantized), on ``threads``
    torch threads (default: torch's own choice)."""
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)

    from pipelines import data as D
    from pipelines.model import load_base

    t0 = time.perf_counter()
    plain = spec.model_copy(
        update={"model": spec.model.model_copy(update={"quantization": "none", "quantization_plan": {}})}
    )
    model, tok, _ = load_base(plain, log=lambda *_: None)
    model.eval()
    records, _ = D.train_eval_records(spec.data, spec.train.seed)
    ex = D.encode_all(records[:samples], spec.data, tok, packing=False)
    batch = D.collate(ex, tok.pad_token_id)
    mask = batch["labels"][:, 1:] != -100

    def logprobs():
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        return torch.log_softmax(logits, -1)[mask]

    ref = logprobs()
    layers = model.model.layers
    sens: dict[int, list[float]] = {b: [] for b in bits if b != 16}
    for _i, layer in enumerate(layers):
        linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        for b in sens:
            saved = [m.weight.data.clone() for m in linears]
            for m in linears:
                m.weight.data = fake_quant(m.weight.data, b)
            kl = torch.nn.functional.kl_div(logprobs(), ref, log_target=True, reduction="batchmean").item()
            for m, w in zip(linears, saved):
                m.weight.data = w
            sens[b].append(max(kl, 0.0))
    # importance: squared gradient norms of the target linears, one backward over the calibration set
    for p in model.parameters():
        p.requires_grad_(False)
    tracked = [
        [m.weight for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in targets]
        for layer in layers
    ]
    for ws in tracked:
        for w in ws:
            w.requires_grad_(True)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()
    raw = [sum(float(w.grad.pow(2).sum()) for w in ws) for ws in tracked]
    total = sum(raw) or 1.0
    log(
        f"[raypeft] calibration on {len(ex)} examples, {torch.get_num_threads()} thread(s): {len(layers)} layers in {time.perf_counter() - t0:.1f}s"
    )
    return {"sensitivity": sens, "importance": [r / total for r in raw], "loss": out.loss.item(), "samples": len(ex)}
