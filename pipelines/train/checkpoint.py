"""The worker's checkpoints: where a run starts (``resume``: Ray Train's latest checkpoint, or the base's own
eval on a fresh run), what every rank saves and reports (``report_checkpoint``, with a probe of the trained
model's logits), and the run's end (``finish``)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from pipelines.spec import PROBE_FILE
from pipelines.train.state import DataSetup, ModelSetup, Progress, Worker, fmt_span


def resume(w: Worker, m: ModelSetup, d: DataSetup) -> Progress:
    """From the latest checkpoint Ray Train hands this worker, if any; else, on a fresh run that asks for it,
    the base model's own eval (adapter off) as the baseline."""
    import ray.train

    from pipelines.train.evaluate import evaluate

    spec = w.spec
    setup_s = time.perf_counter() - w.t0 - m.model_load_s  # imports, method, pre-flight, engine, data
    start_step = 0
    ckpt = ray.train.get_checkpoint()
    metrics: dict[str, float] = {}
    startup = {"model_load_s": m.model_load_s, "data_open_s": d.data_open_s, "worker_setup_s": setup_s}
    model = m.model
    if ckpt:
        t0 = time.perf_counter()
        with ckpt.as_directory() as c:
            start_step = m.engine.load(Path(c))
            saved = json.loads((Path(c) / "metrics.json").read_text())
        metrics.update({k: v for k, v in saved.items() if k.startswith("base_")})
        restore_s = startup["checkpoint_restore_s"] = time.perf_counter() - t0
        w.log(f"resumed from checkpoint at step {start_step} (restored in {restore_s:.1f}s)")
        if w.logger:
            w.logger.log({"resumed_from_step": start_step, "checkpoint_restore_s": restore_s}, start_step)
    elif spec.train.eval_base and len(d.eval_ex) > 0 and m.prepared.is_peft and hasattr(model, "disable_adapter"):
        t0 = time.perf_counter()
        with model.disable_adapter():
            metrics.update(evaluate(w, m, d, 0, prefix="base_"))
        startup["base_eval_s"] = time.perf_counter() - t0
    return Progress(start_step, metrics, startup)


def report_checkpoint(w: Worker, m: ModelSetup, d: DataSetup, step: int, metrics: dict[str, float]) -> None:
    """Every rank saves its part of the checkpoint and reports it; Ray Train merges them."""
    import ray.train
    import torch

    t0 = time.perf_counter()
    probe = probe_logits(m.model, d.eval_ex[0] if d.eval_ex else d.train_ex[0], w.device)
    with tempfile.TemporaryDirectory() as tmp:
        m.engine.save(Path(tmp), step)
        if w.is_main:
            torch.save({"input_ids": probe[0], "logits": probe[1], "step": step}, Path(tmp) / PROBE_FILE)
            (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(
            {**metrics, "step": step},
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"step_{step:07d}",
        )
    save_s = time.perf_counter() - t0
    w.log(f"checkpoint @ step {step} saved in {save_s:.1f}s")
    if w.logger:
        w.logger.log({"checkpoint_save_s": save_s}, step)


def probe_logits(model, example: dict, device, max_tokens: int = 32):
    """(input_ids, logits) of ``model`` on the first ``max_tokens`` tokens of ``example``. Collective under ZeRO-3."""
    import torch

    ids = torch.tensor([example["input_ids"][:max_tokens]], device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().cpu()
    model.train(was_training)
    return ids.cpu(), logits


def finish(w: Worker, m: ModelSetup, d: DataSetup, p: Progress, t_start: float) -> None:
    """A resumed run that had already finished reports its final state (and adapter) again; then the end."""
    if p.start_step >= w.spec.train.max_steps:
        report_checkpoint(w, m, d, p.start_step, dict(p.metrics))
    w.log(f"finished in {fmt_span(time.perf_counter() - t_start)}")
