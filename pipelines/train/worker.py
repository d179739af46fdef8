"""The Ray Train worker: ``train_worker`` runs inside each Ray Train V2 ``TorchTrainer`` worker, whose process
group (gloo on CPU, NCCL on GPU) Ray Train has already initialized. It reads top to bottom as the job, one
named phase each, in a module each, along the job's path; what passes between them is ``state``'s dataclasses:

- ``start_worker`` (here): rank, device, seeds, the step logger, where the group's workers run;
- ``setup.setup_model``: the base, the method, the micro-batch layout, the pre-flight, the engine;
- ``inputs.open_data``: the tokenized splits, the sharder, the task's eval prompts;
- ``checkpoint.resume``: the latest checkpoint, or the base's own eval;
- ``loop.run_steps``: the steps, evals and checkpoints;
- ``checkpoint.finish``: the run's end.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from pipelines.train.checkpoint import finish, resume
from pipelines.train.inputs import open_data
from pipelines.train.loop import run_steps
from pipelines.train.setup import setup_model
from pipelines.train.state import Worker


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``. ``config``: spec (validated JobSpec), run_id, tracking_uri
    (run_id None: no MLflow logging here), report_evals (report every eval to Ray Train, for Tune), data_dir."""
    w = start_worker(config)
    m = setup_model(w)
    d = open_data(w, m)
    progress = resume(w, m, d)
    t_start = run_steps(w, m, d, progress)
    finish(w, m, d, progress, t_start)


def start_worker(config: dict[str, Any]) -> Worker:
    """Rank, device, seeds and threads of this worker, its step logger, and where the group's workers run
    (logged, and tagged on the run at each (re)start: a node loss shows as a new placement)."""
    started_at, t0 = time.time(), time.perf_counter()
    import ray.train
    import torch

    from pipelines.tracking import StepLogger

    spec = config["spec"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.scaling.torch_threads or max(1, int(spec.scaling.cpus_per_worker)))
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if spec.scaling.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(spec.train.seed)
    random.seed(spec.train.seed)
    nodes = _placement(world)
    logger = StepLogger(config["tracking_uri"], config["run_id"]) if rank == 0 and config.get("run_id") else None
    w = Worker(spec, config, rank, world, device, logger, started_at, t0)
    w.log(f"workers on {len(set(nodes))} node(s): " + ", ".join(f"rank {r} → {n[:12]}" for r, n in enumerate(nodes)))
    if logger:
        logger.client.set_tag(config["run_id"], "raypeft.worker_nodes", json.dumps(nodes))
    return w


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
