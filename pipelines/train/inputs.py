"""The worker's data phase: the splits the driver tokenized once (``pipelines.data.prepare``), memory-mapped
here and read a batch at a time, this rank's sharder, and the eval prompts of the task's score."""

from __future__ import annotations

import time

from pipelines.train.state import DataSetup, ModelSetup, Worker


def open_data(w: Worker, m: ModelSetup) -> DataSetup:
    """The run's data as ``DataSetup``, logged."""
    from pipelines import data as D

    spec = w.spec
    t_data = time.perf_counter()
    train_ex, eval_ex, eval_records, layout = D.open_layout(w.config["data_dir"])
    data_open_s = time.perf_counter() - t_data
    w.log(
        f"data: {len(train_ex)} train rows{' (packed)' if layout['packed'] else ''}, {len(eval_ex)} eval rows, "
        f"format {spec.data.format}"
    )
    w.log(f"{'packed ' if layout['packed'] else ''}micro-batches: {m.layout.how}")
    if w.logger:  # which attention path the run took, beside the spec's params
        w.logger.client.set_tag(w.config["run_id"], "raypeft.micro_batches", m.layout.how)
        w.logger.client.set_tag(w.config["run_id"], "raypeft.attention", m.layout.attention)
    prompts = None
    if spec.data.task != "none" and eval_records and (w.is_main or m.lockstep):  # the ranks that score
        prompts = D.task_prompts(eval_records, spec.data.format, spec.data.eval_task_samples, m.tok)
    sharder = D.Sharder(len(train_ex), spec.train.micro_batch_size, w.world, w.rank, spec.train.seed)
    return DataSetup(train_ex, eval_ex, sharder, m.layout, m.tok.pad_token_id, prompts, data_open_s)
