"""The Ray Train worker: setup → (resume) → train with periodic eval and checkpoints → save.

``train_worker`` runs inside each Ray Train V2 ``TorchTrainer`` worker. The
process group (gloo on CPU, NCCL on GPU) is already initialized by Ray Train.
It reads top to bottom as the job: load base → build method → data → loop.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.spec import JobSpec

from pipelines.engines import ADAPTER_DIR, PROBE_FILE  # noqa: F401  (ADAPTER_DIR: the driver reads it)


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
    from pipelines.loss import label_tokens

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
    from pipelines import attention, methods

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


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``. ``config``: spec (validated JobSpec), run_id, tracking_uri
    (run_id None: no MLflow logging here), report_evals (report every eval to Ray Train, for Tune)."""
    worker_started_at = time.time()  # once the Train controller and worker group are up
    t_worker = time.perf_counter()  # the worker's own spans use the monotonic clock
    import ray.train
    import torch
    import torch.distributed as dist

    from pipelines import data as D
    from pipelines import methods, preflight
    from pipelines.engines import build_engine, deepspeed_setup, probe_logits
    from pipelines.evaluate import eval_loss, task_score
    from pipelines.models import load_base, one_4bit_layout
    from pipelines.prepare import open_layout
    from pipelines.tracking import StepLogger

    spec: JobSpec = config["spec"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    is_main = rank == 0

    def log(msg: str) -> None:
        if is_main:
            print(f"[raypeft] {msg}", flush=True)

    # ---- setup
    torch.set_num_threads(spec.scaling.torch_threads or max(1, int(spec.scaling.cpus_per_worker)))
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if spec.scaling.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(spec.train.seed)
    random.seed(spec.train.seed)

    ds_config = spec.deepspeed_config()
    hf_ds = deepspeed_setup(
        ds_config, device, quantized=spec.quantization() != "none"
    )  # keep alive: ZeRO-3 partitions weights while they load
    t_load = time.perf_counter()
    base, tok, _ = load_base(spec, device=device, log=log)
    # evals and checkpoint probes must not switch the 4-bit kernel mid-run
    if one_4bit_layout(base) and device.type == "cpu":
        log(
            "quantized base on CPU: bitsandbytes' own kernels (NF4 dequantized per matmul); its AVX512-BF16 "
            "inference kernel and the optional `kernels` hub package are not used in training"
        )
    model_load_s = time.perf_counter() - t_load
    base_modules = preflight.module_names(base)
    prepared = methods.build(spec, base)
    model = prepared.model
    if spec.quantization() == "none" and hf_ds is None:
        model.to(device)
    model.train()
    # before step 0: base frozen, optimizer = trainables, targets matched, B = 0, dtype/quantization
    report = preflight.check(spec, prepared, base_modules)
    log(f"method {spec.method.name}: pre-flight ok, " + report.summary().replace("\n", "; "))
    engine = build_engine(spec, prepared, rank, world, device, ds_config)
    log(
        f"strategy {spec.scaling.strategy}: {world} worker(s), global batch {spec.global_batch_size()} "
        f"= {spec.train.micro_batch_size} × {spec.grad_accum()} accumulation × {world}"
    )

    # tokenized once by the driver (pipelines.prepare); memory-mapped here, read a batch at a time
    t_data = time.perf_counter()
    train_ex, eval_ex, eval_records, layout = open_layout(config["data_dir"])
    data_open_s = time.perf_counter() - t_data
    log(
        f"data: {len(train_ex)} train rows{' (packed)' if layout['packed'] else ''}, {len(eval_ex)} eval rows, "
        f"format {spec.data.format}"
    )
    batches_as = batch_layout(spec, model)
    log(f"{'packed ' if layout['packed'] else ''}micro-batches: {batches_as.how}")
    sharder = D.Sharder(len(train_ex), spec.train.micro_batch_size, world, rank, spec.train.seed)
    pad_id = tok.pad_token_id
    base_lrs = [g["lr"] for g in engine.param_groups]
    # ZeRO-3 gathers weights collectively inside every forward: all ranks must run the same forwards
    lockstep = ds_config is not None and ds_config["zero_optimization"]["stage"] == 3

    def set_lr(step: int) -> float:
        f = lr_factor(step, spec)
        for g, lr0 in zip(engine.param_groups, base_lrs):
            g["lr"] = lr0 * f
        return base_lrs[0] * f

    logger = StepLogger(config["tracking_uri"], config["run_id"]) if is_main and config.get("run_id") else None
    nodes = _placement(world)
    log(f"workers on {len(set(nodes))} node(s): " + ", ".join(f"rank {r} → {n[:12]}" for r, n in enumerate(nodes)))
    if logger:  # each (re)start records where its workers run: a node loss shows as a new placement
        logger.client.set_tag(config["run_id"], "raypeft.worker_nodes", json.dumps(nodes))
    mb = spec.train.micro_batch_size

    has_eval = len(eval_ex) > 0  # no eval split (data.eval_fraction 0): no eval metric, rather than a made-up 0

    def evaluate(step: int, prefix: str = "") -> dict[str, float]:
        out = eval_loss(model, eval_ex, mb, pad_id, device, rank, world, lockstep=lockstep)
        if spec.data.task != "none" and (is_main or lockstep):
            res = task_score(
                model,
                tok,
                eval_records,
                spec.data.format,
                spec.data.task,
                spec.data.eval_task_samples,
                device,
                synced=lockstep,
            )
            for _prompt, pred, ref in res.pop("_examples", []):
                log(f"  sample → {pred.strip()[:100]!r} (expected {ref[:100]!r})")
            out.update(res)
        out = {prefix + k: v for k, v in out.items()}
        log(f"eval @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
        if logger:
            logger.log(out, step)
        return out

    # ---- resume
    setup_s = time.perf_counter() - t_worker - model_load_s  # imports, method, pre-flight, engine, data
    start_step = 0
    ckpt = ray.train.get_checkpoint()
    final_metrics: dict[str, float] = {}
    startup = {"model_load_s": model_load_s, "data_open_s": data_open_s, "worker_setup_s": setup_s}
    if ckpt:
        t0 = time.perf_counter()
        with ckpt.as_directory() as d:
            start_step = engine.load(Path(d))
            saved = json.loads((Path(d) / "metrics.json").read_text())
        final_metrics.update({k: v for k, v in saved.items() if k.startswith("base_")})
        restore_s = startup["checkpoint_restore_s"] = time.perf_counter() - t0
        log(f"resumed from checkpoint at step {start_step} (restored in {restore_s:.1f}s)")
        if logger:
            logger.log({"resumed_from_step": start_step, "checkpoint_restore_s": restore_s}, start_step)
    elif spec.train.eval_base and has_eval and prepared.is_peft and hasattr(model, "disable_adapter"):
        t0 = time.perf_counter()
        with model.disable_adapter():
            final_metrics.update(evaluate(0, prefix="base_"))
        startup["base_eval_s"] = time.perf_counter() - t0

    # ---- train
    def report(step: int, metrics: dict[str, float]) -> None:
        """Every rank saves its part of the checkpoint and reports it; Ray Train merges them."""
        t0 = time.perf_counter()
        probe = probe_logits(model, eval_ex[0] if eval_ex else train_ex[0], device)
        with tempfile.TemporaryDirectory() as tmp:
            engine.save(Path(tmp), step)
            if is_main:
                torch.save({"input_ids": probe[0], "logits": probe[1], "step": step}, Path(tmp) / PROBE_FILE)
                (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
            ray.train.report(
                {**metrics, "step": step},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"step_{step:07d}",
            )
        save_s = time.perf_counter() - t0
        log(f"checkpoint @ step {step} saved in {save_s:.1f}s")
        if logger:
            logger.log({"checkpoint_save_s": save_s}, step)

    accum = spec.grad_accum()
    t_start = t_last = time.perf_counter()
    # the worker's start-up, in parts that add up to its first step's end: model load, setup, base eval
    # or checkpoint restore, first step
    before_step = " + ".join(f"{v:.1f}s {k[:-2].replace('_', ' ')}" for k, v in startup.items() if k != "data_open_s")
    tokens_since, slots_since, filled_since = 0, 0, 0  # examples' tokens; token slots computed; slots not padding
    loss_sum = torch.zeros(2, dtype=torch.float64)
    lr = set_lr(start_step)
    metrics: dict[str, float] = dict(final_metrics)
    for step in range(start_step, spec.train.max_steps):
        rows = [[train_ex[i] for i in sharder.indices(step * accum + m)] for m in range(accum)]
        batches = [D.collate(r, pad_id, batches_as.padding_free, batches_as.share_prefix) for r in rows]
        loss_sum += torch.tensor(accumulate(engine, batches, world, device), dtype=torch.float64)
        tokens_since += sum(len(r["input_ids"]) for micro in rows for r in micro)
        slots_since += sum(b["input_ids"].numel() for b in batches)  # what the model computed on, pads included
        filled_since += sum(
            int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches
        )
        engine.finish_step(step)
        done = step + 1
        if step == start_step:  # what a worker holds once training runs, and how long it took to start
            first_step_s = time.perf_counter() - t_start
            first_step_at = worker_started_at + (time.perf_counter() - t_worker)
            log(f"first step done: worker start-up {before_step}, step {first_step_s:.1f}s")
            if logger:
                import psutil

                logger.log(
                    {
                        **{k: v for k, v in startup.items() if k != "checkpoint_restore_s"},  # logged at resume
                        "worker_rss_mib": psutil.Process().memory_info().rss / 2**20,
                        "worker_started_at": worker_started_at,
                        "first_step_s": first_step_s,
                        "first_step_at": first_step_at,
                    },
                    done,
                )
        lr_used = lr
        lr = set_lr(done)

        if done % spec.train.log_every == 0 or done == spec.train.max_steps:
            stats = torch.tensor(  # on the worker's device: NCCL reduces GPU tensors only
                [loss_sum[0].item(), loss_sum[1].item(), float(tokens_since), float(slots_since), float(filled_since)],
                dtype=torch.float64,
                device=device,
            )
            if world > 1:
                dist.all_reduce(stats)
            now = time.perf_counter()
            tok_s = stats[2].item() / max(now - t_last, 1e-9)
            eta = (now - t_start) / max(done - start_step, 1) * (spec.train.max_steps - done)
            metrics = {
                "train_loss": stats[0].item() / max(stats[1].item(), 1),
                "lr": lr_used,
                "tokens_per_s": tok_s,
                "real_token_fraction": stats[4].item() / max(stats[3].item(), 1),  # slots not padding ÷ slots
                # the examples' tokens a shared prefix spared computing (data.share_prefix), over all of them
                "shared_prefix_fraction": 1 - stats[4].item() / max(stats[2].item(), 1),
            }
            log(
                f"step {done}/{spec.train.max_steps} loss {metrics['train_loss']:.4f} lr {lr_used:.2e} tok/s {tok_s:,.0f} eta {_fmt_eta(eta)}"
            )
            if logger:
                logger.log({**metrics, "epoch": sharder.epoch_of(done * accum)}, done)
            loss_sum.zero_()
            tokens_since, slots_since, filled_since, t_last = 0, 0, 0, now
            final_metrics["train_loss"] = metrics["train_loss"]

        is_last = done == spec.train.max_steps
        evaluated = has_eval and ((spec.train.eval_every and done % spec.train.eval_every == 0) or is_last)
        if evaluated:
            final_metrics.update(evaluate(done))
        every = spec.checkpoint.every_steps
        if (every and done % every == 0) or is_last:
            report(done, dict(final_metrics))
            t_last = time.perf_counter()  # checkpoint time is not training throughput
        elif evaluated and config.get("report_evals"):  # a Tune trial: the scheduler decides on every eval
            ray.train.report({**final_metrics, "step": done})
    if start_step >= spec.train.max_steps:  # resumed a finished run: report its final state again
        report(start_step, dict(final_metrics))
    log(f"finished in {_fmt_eta(time.perf_counter() - t_start)}")
