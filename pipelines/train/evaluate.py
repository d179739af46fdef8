"""Evaluation: token-weighted eval loss / perplexity (sharded across ranks) and task metrics by greedy
generation; ``evaluate`` runs both for a training run at a step and logs them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipelines.data import eval_batches, task_prompts

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.train.state import DataSetup, ModelSetup, Worker


def evaluate(w: Worker, m: ModelSetup, d: DataSetup, step: int, prefix: str = "") -> dict[str, float]:
    """Eval loss over the eval split (and the task's score where the spec names one), logged at ``step``."""
    spec = w.spec
    scores: dict[str, Any] = {}
    if d.task_prompts and (w.is_main or m.lockstep):
        prompts, refs = d.task_prompts
        scores = score_completions(m.model, m.tok, prompts, refs, spec.data.task, w.device, synced=m.lockstep)
        for _prompt, pred, ref in scores.pop("_examples", []):
            w.log(f"  sample → {pred.strip()[:100]!r} (expected {ref[:100]!r})")
    loss = eval_loss(
        m.model, d.eval_ex, spec.train.micro_batch_size, d.pad_id, w.device, w.rank, w.world, lockstep=m.lockstep
    )
    out = {prefix + k: v for k, v in {**loss, **scores}.items()}
    w.log(f"eval @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
    if w.logger:
        w.logger.log(out, step)
    return out


def task_metric(task: str) -> tuple[str, Callable[[list[str], list[str]], float]] | None:
    if task == "none":
        return None
    if task == "json_extract":
        from pipelines.datasets.json_extract import exact_match

        return "exact_match", exact_match
    raise KeyError(task)


def eval_loss(
    model,
    examples: list[dict],
    batch_size: int,
    pad_id: int,
    device,
    rank: int = 0,
    world: int = 1,
    lockstep: bool = False,
) -> dict[str, float]:
    """Mean loss per completion token over the eval set (all ranks together).

    ``lockstep``: every rank runs the same number of forward passes (ZeRO-3 gathers
    weights collectively in each forward); a rank whose shard ran out repeats a
    batch and discards it.
    """
    import torch
    import torch.distributed as dist

    total = torch.zeros(2, dtype=torch.float64, device=device)
    model.eval()
    with torch.no_grad():
        for rows, weight in eval_batches(examples, batch_size, pad_id, rank, world, lockstep):
            batch = {k: v.to(device) for k, v in rows.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"]
            if logits.shape[1] != labels.shape[1]:  # prompt-learning methods prepend virtual tokens
                logits = logits[:, -labels.shape[1] :]
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]),
                shift_labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += weight * torch.stack([loss.double(), (shift_labels != -100).sum().double()])
    if world > 1 and dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))}


def generate_completions(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, device, synced: bool = False
) -> list[str]:
    """Greedy completions for ``prompts`` (left-padded batches). ``synced``: ZeRO-3 lockstep across ranks."""
    import torch

    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[str] = []
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                enc = tokenizer(
                    prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(device)
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    synced_gpus=synced,
                )
                outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
        model.train()
    return outs


def task_score(
    model,
    tokenizer,
    records: list[dict],
    fmt: str,
    task: str,
    n: int,
    device,
    batch_size: int = 16,
    synced: bool = False,
) -> dict[str, Any]:
    """Greedy-generate the first ``n`` eval records and score them with the task metric.

    ``synced``: every rank calls this on the same records (ZeRO-3), generating in lockstep.
    """
    if task_metric(task) is None or not records:
        return {}
    prompts, refs = task_prompts(records, fmt, n, tokenizer)
    return score_completions(model, tokenizer, prompts, refs, task, device, batch_size, synced)


def score_completions(
    model, tokenizer, prompts: list[str], refs: list[str], task: str, device, batch_size: int = 16, synced: bool = False
) -> dict[str, Any]:
    """Greedy completions of ``prompts`` scored against ``refs`` with the task's metric, and two examples."""
    name, fn = task_metric(task)
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs)
    preds = generate_completions(model, tokenizer, prompts, longest + 8, batch_size, device, synced)
    return {name: fn(preds, refs), "_examples": list(zip(prompts[:2], preds[:2], refs[:2]))}
