"""What passes between the worker's phases (``worker.train_worker``): who and where the worker is (``Worker``),
the model and the engine that steps it (``ModelSetup``), the data it reads (``DataSetup``), and how far the run
has come (``Progress``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.spec import JobSpec
    from pipelines.train.attention import Layout


def fmt_span(seconds: float) -> str:
    """``125.3`` → ``2m05s``: an ETA or a run's length in the log."""
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


@dataclass
class Worker:
    """Who and where this worker is: the spec, its rank in the group, its device, and its MLflow step logger
    (rank 0 of a logged run only)."""

    spec: JobSpec
    config: dict[str, Any]
    rank: int
    world: int
    device: Any
    logger: Any  # pipelines.tracking.StepLogger | None
    started_at: float  # wall clock, once the Train controller and worker group are up
    t0: float  # the worker's own spans use the monotonic clock

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[raypeft] {msg}", flush=True)


@dataclass
class ModelSetup:
    """``setup.setup_model``'s result: the method's model, the tokenizer, how its micro-batches are laid out,
    and the engine that steps it."""

    prepared: Any  # pipelines.model.methods.Prepared
    tok: Any
    layout: Layout
    engine: Any
    lockstep: bool  # ZeRO-3 gathers weights collectively inside every forward: all ranks run the same forwards
    model_load_s: float
    base_lrs: list[float]  # each param group's learning rate as built: a restored optimizer's are scheduled ones

    @property
    def model(self):
        return self.prepared.model


@dataclass
class DataSetup:
    """``inputs.open_data``'s result: the memory-mapped splits, this rank's sharder, the eval prompts of the
    task's score (None without one), and the micro-batches of a step."""

    train_ex: Any
    eval_ex: Any
    sharder: Any  # pipelines.data.Sharder
    layout: Layout
    pad_id: int
    task_prompts: tuple[list[str], list[str]] | None
    data_open_s: float

    def micro_batches(self, step: int, accum: int) -> tuple[list[list[dict]], list[dict]]:
        """Optimizer step ``step``'s rows on this rank, one list per micro-step, and ``collate``'s tensors of each."""
        from pipelines.data import collate

        rows = [[self.train_ex[i] for i in self.sharder.indices(step * accum + k)] for k in range(accum)]
        return rows, [collate(r, self.pad_id, self.layout.padding_free, self.layout.share_prefix) for r in rows]


@dataclass
class Progress:
    """What passes from ``checkpoint.resume`` to ``loop.run_steps`` and ``checkpoint.finish``: the first step to
    run, the metrics so far (the base's eval, or a restored run's), and the start-up spans logged with the
    first step."""

    start_step: int
    metrics: dict[str, float]
    startup: dict[str, float]

    def log_first_step(self, w: Worker, first_step_s: float, before_step: str, step: int) -> None:
        """What a worker holds once training runs, and how long it took to start."""
        w.log(f"first step done: worker start-up {before_step}, step {first_step_s:.1f}s")
        if w.logger:
            import psutil

            w.logger.log(
                {
                    **{k: v for k, v in self.startup.items() if k != "checkpoint_restore_s"},  # logged at resume
                    "worker_rss_mib": psutil.Process().memory_info().rss / 2**20,
                    "worker_started_at": w.started_at,
                    "first_step_s": first_step_s,
                    "first_step_at": w.started_at + (time.perf_counter() - w.t0),
                },
                step,
            )
