"""The Ray Train worker: setup → (resume) → train with periodic eval and checkpoints → save.

``train_worker`` runs inside each Ray Train V2 ``TorchTrainer`` worker. The
process group (gloo on CPU, NCCL on GPU) is already initialized by Ray Train.
It reads top to bottom as the job, one named phase each: start_worker → setup_model → open_data → resume →
run_steps → finish.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.spec import JobSpec

from pipelines.spec import PROBE_FILE


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


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def accumulate(engine, batches: list[dict], world: int, device) -> tuple[float, float]:
    """Forward and backward of one optimizer step's micro-batches (``collate``'s) on this worker, the loss
    normalized by the label tokens of the whole global batch: every micro-step of every worker, counted
    up front and summed across workers. A step's gradient is then the global batch's mean token loss
    whatever its split into workers and micro-steps. Returns this worker's (summed token loss, tokens)."""
    import torch
    import torch.distributed as dist

    from pipelines.data import model_inputs
    from pipelines.train.loss import label_tokens

    local = [label_tokens(b["labels"]) for b in batches]
    counted = torch.tensor([float(sum(local))], dtype=torch.float64, device=device)  # NCCL: a device tensor
    if world > 1:
        dist.all_reduce(counted)
    total = 0.0
    for m, batch in enumerate(batches):
        total += engine.micro_step(model_inputs(batch, device), m == len(batches) - 1, int(counted.item())).item()
    return total, float(sum(local))


def _placement(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order (one all-gather over the training group)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    nodes: list[str] = [""] * world
    dist.all_gather_object(nodes, node)
    return nodes


class Layout(NamedTuple):
    """How a run's micro-batches are laid out (``batch_layout``): ``data.collate``'s switches and a line
    for the log."""

    padding_free: bool
    share_prefix: bool
    how: str


def batch_layout(spec: JobSpec, model) -> Layout:
    """Whether this run's micro-batches are padding-free (``methods.padding_free``), switching ``model`` to
    per-example SDPA when they are and it can, and whether they compute a shared prefix once
    (``methods.share_prefix``)."""
    from pipelines.model import methods
    from pipelines.train import attention

    flash = str(getattr(model.config, "_attn_implementation", "")).startswith("flash_attention")
    if not methods.padding_free(spec, attention.supported(model) or flash):
        methods.share_prefix(spec, False, False)  # data.share_prefix: true raises here, naming the field
        return Layout(False, False, "padded rows, one per example")
    varlen = attention.enable(model)
    share = methods.share_prefix(spec, True, varlen)
    if varlen:
        how = f"attention per example ({attention.VARLEN})" + (", a shared prefix computed once" if share else "")
    elif flash:
        how = "attention per example (flash-attention varlen)"
    else:
        how = "attention through transformers' block-diagonal mask"
    return Layout(True, share, "padding-free rows; " + how)


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
    """``setup_model``'s result: the method's model, the tokenizer and the engine that steps it."""

    prepared: Any  # pipelines.model.methods.Prepared
    tok: Any
    engine: Any
    lockstep: bool  # ZeRO-3 gathers weights collectively inside every forward: all ranks run the same forwards
    model_load_s: float
    base_lrs: list[float]  # each param group's learning rate as built: a restored optimizer's are scheduled ones

    @property
    def model(self):
        return self.prepared.model


@dataclass
class DataSetup:
    """``open_data``'s result: the memory-mapped splits, how micro-batches are laid out, and the sharder."""

    train_ex: Any
    eval_ex: Any
    eval_records: list
    layout: Layout
    sharder: Any  # pipelines.data.records.Sharder
    pad_id: int
    data_open_s: float


@dataclass
class Progress:
    """What passes from ``resume`` to ``run_steps`` and ``finish``: the first step to run, the metrics so far
    (the base's eval, or a restored run's), and the start-up spans logged with the first step."""

    start_step: int
    metrics: dict[str, float]
    startup: dict[str, float]


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``. ``config``: spec (validated JobSpec), run_id, tracking_uri
    (run_id None: no MLflow logging here), report_evals (report every eval to Ray Train, for Tune)."""
    w = start_worker(config)
    m = setup_model(w)
    d = open_data(w, m)
    progress = resume(w, m, d)
    t_start = run_steps(w, m, d, progress)
    finish(w, m, d, progress, t_start)


def start_worker(config: dict[str, Any]) -> Worker:
    """Rank, device, seeds and threads of this worker, and its step logger."""
    started_at, t0 = time.time(), time.perf_counter()
    import ray.train
    import torch

    from pipelines.tracking import StepLogger

    spec: JobSpec = config["spec"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.scaling.torch_threads or max(1, int(spec.scaling.cpus_per_worker)))
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if spec.scaling.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(spec.train.seed)
    random.seed(spec.train.seed)
    logger = StepLogger(config["tracking_uri"], config["run_id"]) if rank == 0 and config.get("run_id") else None
    return Worker(spec, config, rank, world, device, logger, started_at, t0)


def setup_model(w: Worker) -> ModelSetup:
    """The base (partitioned as it loads under ZeRO-3), the method on it, its pre-flight, and the engine."""
    from pipelines.model import load_base, methods, one_4bit_layout
    from pipelines.train import preflight
    from pipelines.train.engines import build_engine, deepspeed_setup

    spec, device = w.spec, w.device
    ds_config = spec.deepspeed_config()
    hf_ds = deepspeed_setup(
        ds_config, device, quantized=spec.quantization() != "none"
    )  # keep alive: ZeRO-3 partitions weights while they load
    t_load = time.perf_counter()
    base, tok, _ = load_base(spec, device=device, log=w.log)
    # evals and checkpoint probes must not switch the 4-bit kernel mid-run
    if one_4bit_layout(base) and device.type == "cpu":
        w.log(
            "quantized base on CPU: bitsandbytes' own kernels (NF4 dequantized per matmul); its AVX512-BF16 "
            "inference kernel and the optional `kernels` hub package are not used in training"
        )
    model_load_s = time.perf_counter() - t_load
    base_modules = preflight.module_names(base)
    prepared = methods.build(spec, base)
    if spec.quantization() == "none" and hf_ds is None:
        prepared.model.to(device)
    prepared.model.train()
    # before step 0: base frozen, optimizer = trainables, targets matched, B = 0, dtype/quantization
    report = preflight.check(spec, prepared, base_modules)
    w.log(f"method {spec.method.name}: pre-flight ok, " + report.summary().replace("\n", "; "))
    engine = build_engine(spec, prepared, w.rank, w.world, device, ds_config)
    w.log(
        f"strategy {spec.scaling.strategy}: {w.world} worker(s), global batch {spec.global_batch_size()} "
        f"= {spec.train.micro_batch_size} × {spec.grad_accum()} accumulation × {w.world}"
    )
    lockstep = ds_config is not None and ds_config["zero_optimization"]["stage"] == 3
    return ModelSetup(prepared, tok, engine, lockstep, model_load_s, [g["lr"] for g in engine.param_groups])


def open_data(w: Worker, m: ModelSetup) -> DataSetup:
    """The splits the driver tokenized once (pipelines.data.prepare), memory-mapped here and read a batch at a
    time; the micro-batch layout; this rank's sharder; and where the group's workers run."""
    from pipelines import data as D
    from pipelines.data import open_layout

    spec = w.spec
    t_data = time.perf_counter()
    train_ex, eval_ex, eval_records, layout = open_layout(w.config["data_dir"])
    data_open_s = time.perf_counter() - t_data
    w.log(
        f"data: {len(train_ex)} train rows{' (packed)' if layout['packed'] else ''}, {len(eval_ex)} eval rows, "
        f"format {spec.data.format}"
    )
    batches_as = batch_layout(spec, m.model)
    w.log(f"{'packed ' if layout['packed'] else ''}micro-batches: {batches_as.how}")
    sharder = D.Sharder(len(train_ex), spec.train.micro_batch_size, w.world, w.rank, spec.train.seed)
    nodes = _placement(w.world)
    w.log(f"workers on {len(set(nodes))} node(s): " + ", ".join(f"rank {r} → {n[:12]}" for r, n in enumerate(nodes)))
    if w.logger:  # each (re)start records where its workers run: a node loss shows as a new placement
        w.logger.client.set_tag(w.config["run_id"], "raypeft.worker_nodes", json.dumps(nodes))
    return DataSetup(train_ex, eval_ex, eval_records, batches_as, sharder, m.tok.pad_token_id, data_open_s)


def evaluate(w: Worker, m: ModelSetup, d: DataSetup, step: int, prefix: str = "") -> dict[str, float]:
    """Eval loss over the eval split (and the task's score where the spec names one), logged at ``step``."""
    from pipelines.train.evaluate import eval_loss, task_score

    spec = w.spec
    out = eval_loss(
        m.model, d.eval_ex, spec.train.micro_batch_size, d.pad_id, w.device, w.rank, w.world, lockstep=m.lockstep
    )
    if spec.data.task != "none" and (w.is_main or m.lockstep):
        res = task_score(
            m.model,
            m.tok,
            d.eval_records,
            spec.data.format,
            spec.data.task,
            spec.data.eval_task_samples,
            w.device,
            synced=m.lockstep,
        )
        for _prompt, pred, ref in res.pop("_examples", []):
            w.log(f"  sample → {pred.strip()[:100]!r} (expected {ref[:100]!r})")
        out.update(res)
    out = {prefix + k: v for k, v in out.items()}
    w.log(f"eval @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
    if w.logger:
        w.logger.log(out, step)
    return out


def resume(w: Worker, m: ModelSetup, d: DataSetup) -> Progress:
    """From the latest checkpoint Ray Train hands this worker, if any; else, on a fresh run that asks for it,
    the base model's own eval (adapter off) as the baseline."""
    import ray.train

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

    from pipelines.train.engines import probe_logits

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


class _Window:
    """Training metrics summed since the last log line: token loss, examples' tokens, slots computed (pads
    included) and slots that are not padding."""

    def __init__(self, t: float):
        import torch

        self.loss = torch.zeros(2, dtype=torch.float64)
        self.tokens = self.slots = self.filled = 0
        self.t = t  # the window's start

    def add(self, loss: tuple[float, float], rows: list, batches: list[dict]) -> None:
        import torch

        self.loss += torch.tensor(loss, dtype=torch.float64)
        self.tokens += sum(len(r["input_ids"]) for micro in rows for r in micro)
        self.slots += sum(b["input_ids"].numel() for b in batches)  # what the model computed on, pads included
        self.filled += sum(
            int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches
        )

    def metrics(self, w: Worker, lr: float, now: float) -> tuple[dict[str, float], float]:
        """The window's metrics summed over the group, and its tokens per second up to ``now``."""
        import torch
        import torch.distributed as dist

        stats = torch.tensor(  # on the worker's device: NCCL reduces GPU tensors only
            [self.loss[0].item(), self.loss[1].item(), float(self.tokens), float(self.slots), float(self.filled)],
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


def _log_first_step(w: Worker, p: Progress, first_step_s: float, before_step: str, step: int) -> None:
    """What a worker holds once training runs, and how long it took to start."""
    w.log(f"first step done: worker start-up {before_step}, step {first_step_s:.1f}s")
    if w.logger:
        import psutil

        w.logger.log(
            {
                **{k: v for k, v in p.startup.items() if k != "checkpoint_restore_s"},  # logged at resume
                "worker_rss_mib": psutil.Process().memory_info().rss / 2**20,
                "worker_started_at": w.started_at,
                "first_step_s": first_step_s,
                "first_step_at": w.started_at + (time.perf_counter() - w.t0),
            },
            step,
        )


def run_steps(w: Worker, m: ModelSetup, d: DataSetup, p: Progress) -> float:
    """The steps from ``p.start_step``: accumulate, log every ``log_every``, evaluate, checkpoint. Updates
    ``p.metrics``; returns when the steps started (``time.perf_counter``)."""
    import ray.train

    from pipelines import data as D

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
        rows = [[d.train_ex[i] for i in d.sharder.indices(step * accum + k)] for k in range(accum)]
        batches = [D.collate(r, d.pad_id, d.layout.padding_free, d.layout.share_prefix) for r in rows]
        window.add(accumulate(engine, batches, w.world, w.device), rows, batches)
        engine.finish_step(step)
        done = step + 1
        if step == p.start_step:
            _log_first_step(w, p, time.perf_counter() - t_start, before_step, done)
        lr_used, lr = lr, set_lr(done)

        if done % spec.train.log_every == 0 or done == spec.train.max_steps:
            now = time.perf_counter()
            metrics, tok_s = window.metrics(w, lr_used, now)
            eta = (now - t_start) / max(done - p.start_step, 1) * (spec.train.max_steps - done)
            w.log(
                f"step {done}/{spec.train.max_steps} loss {metrics['train_loss']:.4f} lr {lr_used:.2e} tok/s {tok_s:,.0f} eta {_fmt_eta(eta)}"
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


def finish(w: Worker, m: ModelSetup, d: DataSetup, p: Progress, t_start: float) -> None:
    """A resumed run that had already finished reports its final state (and adapter) again; then the end."""
    if p.start_step >= w.spec.train.max_steps:
        report_checkpoint(w, m, d, p.start_step, dict(p.metrics))
    w.log(f"finished in {_fmt_eta(time.perf_counter() - t_start)}")
