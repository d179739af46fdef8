"""The worker's training phase: the steps from where the run resumed, each one accumulated over its
micro-batches with the loss normalized by the global batch's tokens, the learning-rate schedule, the log
line and its metrics every ``log_every``, evals, and checkpoints."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from pipelines.train.attention import flex_length
from pipelines.train.state import DataSetup, ModelSetup, Progress, Worker, fmt_span

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.spec import JobSpec


def lr_factor(step: int, spec: JobSpec) -> float:
    """Multiplier on each group's base LR at optimizer step ``step`` (0-based). Pure."""
    t = spec.train
    if step < t.warmup_steps:
        return (step + 1) / (t.warmup_steps + 1)
    if t.scheduler == "constant":
        return 1.0
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    if t.scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def accumulate(engine, batches: list[dict], world: int, device, varlen: bool = False, flex: bool = False):
    """Forward and backward of one optimizer step's micro-batches (``collate``'s) on this worker, the loss
    normalized by the label tokens of the whole global batch: every micro-step of every worker, counted
    up front and summed across workers. A step's gradient is then the global batch's mean token loss
    whatever its split into workers and micro-steps. Returns this worker's (summed token loss: a 0-dim
    tensor on ``device``, tokens). Nothing is read back from the device (``attention.device_batch``): the
    loss is read on logging steps only (``_Window.metrics``). ``varlen``, ``flex``: the model runs per-example
    attention or FlexAttention (``Layout.varlen``, ``Layout.flex``)."""
    import torch
    import torch.distributed as dist

    from pipelines.train.attention import device_batch
    from pipelines.train.loss import label_tokens

    local = [label_tokens(b["labels"]) for b in batches]  # host tensors: no device sync
    counted = torch.tensor([float(sum(local))], dtype=torch.float64, device=device)  # NCCL: a device tensor
    if world > 1:
        dist.all_reduce(counted)
    tokens = counted[0].to(torch.float32)  # stays on the device; exact below 2**24 tokens a step
    total = torch.zeros((), dtype=torch.float32, device=device)
    for m, batch in enumerate(batches):
        total = total + engine.micro_step(device_batch(batch, device, varlen, flex), m == len(batches) - 1, tokens)
    return total, float(sum(local))


class _Window:
    """Training metrics summed since the last log line: token loss, examples' tokens, slots computed (pads
    included) and slots that are not padding."""

    def __init__(self, t: float):
        self.loss = 0.0  # the summed token loss: a device tensor once added to, read on logging steps only
        self.counted = 0.0  # the label tokens behind it
        self.tokens = self.slots = self.filled = 0
        self.t = t  # the window's start

    def add(self, loss: tuple, rows: list, batches: list[dict], flex: bool = False) -> None:
        """``flex``: the rows ran padded to their ``attention.flex_length`` bucket, which counts as slots."""
        total, counted = loss
        self.loss = self.loss + total.double()
        self.counted += counted
        self.tokens += sum(len(r["input_ids"]) for micro in rows for r in micro)
        width = flex_length if flex else (lambda n: n)
        self.slots += sum(b["input_ids"].shape[0] * width(b["input_ids"].shape[1]) for b in batches)  # pads included
        self.filled += sum(
            int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches
        )

    def metrics(self, w: Worker, lr: float, now: float) -> tuple[dict[str, float], float]:
        """The window's metrics summed over the group, and its tokens per second up to ``now``."""
        import torch
        import torch.distributed as dist

        loss = float(self.loss)  # the window's one device read
        stats = torch.tensor(  # on the worker's device: NCCL reduces GPU tensors only
            [loss, self.counted, float(self.tokens), float(self.slots), float(self.filled)],
            dtype=torch.float64,
            device=w.device,
        )
        if w.world > 1:
            dist.all_reduce(stats)
        tok_s = stats[2].item() / max(now - self.t, 1e-9)
        return {
            "train_loss": stats[0].item() / max(stats[1].item(), 1),
            "lr": lr,
            "tokens_per_s": tok_s,
            "real_token_fraction": stats[4].item() / max(stats[3].item(), 1),  # slots not padding ÷ slots
            # the examples' tokens a shared prefix spared computing (data.share_prefix), over all of them
            "shared_prefix_fraction": 1 - stats[4].item() / max(stats[2].item(), 1),
        }, tok_s


def run_steps(w: Worker, m: ModelSetup, d: DataSetup, p: Progress) -> float:
    """The steps from ``p.start_step``: accumulate, log every ``log_every``, evaluate, checkpoint. Updates
    ``p.metrics``; returns when the steps started (``time.perf_counter``)."""
    import ray.train

    from pipelines.train.checkpoint import report_checkpoint
    from pipelines.train.evaluate import evaluate

    spec, engine, base_lrs = w.spec, m.engine, m.base_lrs

    def set_lr(step: int) -> float:
        f = lr_factor(step, spec)
        for g, lr0 in zip(engine.param_groups, base_lrs):
            g["lr"] = lr0 * f
        return base_lrs[0] * f

    accum, has_eval, final = spec.grad_accum(), len(d.eval_ex) > 0, p.metrics
    t_start = time.perf_counter()
    # the worker's start-up, in parts that add up to its first step's end: model load, setup, base eval
    # or checkpoint restore, first step
    before_step = " + ".join(f"{v:.1f}s {k[:-2].replace('_', ' ')}" for k, v in p.startup.items() if k != "data_open_s")
    window = _Window(t_start)
    lr = set_lr(p.start_step)
    for step in range(p.start_step, spec.train.max_steps):
        rows, batches = d.micro_batches(step, accum)
        loss = accumulate(engine, batches, w.world, w.device, d.layout.varlen, d.layout.flex)
        window.add(loss, rows, batches, d.layout.flex)
        engine.finish_step(step)
        done = step + 1
        if step == p.start_step:
            p.log_first_step(w, time.perf_counter() - t_start, before_step, done)
        lr_used, lr = lr, set_lr(done)

        if done % spec.train.log_every == 0 or done == spec.train.max_steps:
            now = time.perf_counter()
            metrics, tok_s = window.metrics(w, lr_used, now)
            eta = (now - t_start) / max(done - p.start_step, 1) * (spec.train.max_steps - done)
            w.log(
                f"step {done}/{spec.train.max_steps} loss {metrics['train_loss']:.4f} lr {lr_used:.2e} tok/s {tok_s:,.0f} eta {fmt_span(eta)}"
            )
            if w.logger:
                w.logger.log({**metrics, "epoch": d.sharder.epoch_of(done * accum)}, done)
            window = _Window(now)
            final["train_loss"] = metrics["train_loss"]

        is_last = done == spec.train.max_steps
        evaluated = has_eval and ((spec.train.eval_every and done % spec.train.eval_every == 0) or is_last)
        if evaluated:
            final.update(evaluate(w, m, d, done))
        every = spec.checkpoint.every_steps
        if (every and done % every == 0) or is_last:
            report_checkpoint(w, m, d, done, dict(final))
            window.t = time.perf_counter()  # checkpoint time is not training throughput
        elif evaluated and w.config.get("report_evals"):  # a Tune trial: the scheduler decides on every eval
            ray.train.report({**final, "step": done})
    return t_start
