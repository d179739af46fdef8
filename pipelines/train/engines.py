"""How a worker turns micro-batches into optimizer steps: plain torch (single / DDP) or DeepSpeed ZeRO.

The loop calls the same five things whichever strategy runs:
``micro_step(batch, last, tokens)`` → the micro-batch's summed token loss, ``finish_step(step)``, ``param_groups`` (the
loop's LR schedule writes them), ``save(dir, step)`` and ``load(dir)`` → step.

Checkpoint layout (one directory per reported step; every rank writes its own files
into it and Ray Train merges them into one checkpoint):

* ``adapter/``: the standard PEFT adapter dir (the full model for GaLore), rank 0;
* ``state.pt``: trainable tensors + optimizer state + step (torch engine, rank 0);
* ``deepspeed/``: DeepSpeed's own sharded checkpoint (every rank writes its
  optimizer partition; frozen base weights are excluded);
* ``rng_rank{r}.pt``: each rank's torch / python RNG state, so dropout resumes exactly;
* ``probe.pt``: a probe input and the trained model's logits on it, so whoever loads
  ``adapter/`` can check it reproduces the trained model (the near-empty ZeRO-3
  adapter of DeepSpeed issue #4295 fails this check).
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.model import Prepared
    from pipelines.spec import JobSpec

from pipelines.spec import ADAPTER_DIR

STATE_FILE = "state.pt"
DS_DIR = "deepspeed"
DS_TAG = "state"


def save_adapter(model, directory: Path, spec: JobSpec, state_dict: dict | None = None) -> None:
    """The standard PEFT directory (or the full model for GaLore), plus ``raypeft.json``: how the base was
    loaded, so export and serving can rebuild exactly the base the adapter was trained against."""
    import json

    from pipelines.spec import META_FILE, adapter_meta

    kwargs = {"state_dict": state_dict} if state_dict is not None else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    (Path(directory) / META_FILE).write_text(json.dumps(adapter_meta(spec), indent=2))


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def save_rng(path: Path, rank: int) -> None:
    import torch

    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, path / _rng_file(rank))


def load_rng(path: Path, rank: int) -> None:
    import torch

    f = path / _rng_file(rank)
    if not f.is_file():  # a checkpoint written by a different worker count: keep the fresh seed
        return
    state = torch.load(f, map_location="cpu", weights_only=False)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def _at_least_one(tokens):
    """The global batch's label tokens as a divisor: an int, or a 0-dim device tensor (``accumulate``'s,
    clamped on the device rather than compared on the host)."""
    return tokens.clamp(min=1) if hasattr(tokens, "clamp") else max(tokens, 1)


def _regularizer(prepared: Prepared, accum: int):
    """The method's per-step loss term (AdaLoRA's orthogonality), 1/accum of it per micro-step; 0 without one."""
    if prepared.regularizer is None:
        return 0.0
    return prepared.regularizer() / accum


class TorchEngine:
    """One process, or DDP over gloo / NCCL. Gradient accumulation with ``no_sync``."""

    def __init__(self, spec: JobSpec, prepared: Prepared, rank: int, world: int, device):
        import torch

        self.spec, self.prepared, self.rank, self.world = spec, prepared, rank, world
        self.model, self.optimizer = prepared.model, prepared.optimizer
        self.ddp = None
        if world > 1 and not prepared.steps_in_backward:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.chunk = spec.train.loss_chunk_tokens
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]  # clipped every step

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def gather(self):
        return contextlib.nullcontext()

    def micro_step(self, batch: dict, last: bool, tokens: int):
        """Forward and backward of one micro-batch; ``tokens``: the label tokens of the whole global batch,
        so the step's gradient is that of the global batch's mean token loss (DDP averages over ranks)."""
        from pipelines.train.loss import token_loss_sum

        sync = self.ddp is None or last
        with self.ddp.no_sync() if not sync else contextlib.nullcontext():
            total = token_loss_sum(self.ddp or self.model, self.model, batch, self.chunk)
            (
                total * (self.world if self.ddp else 1) / _at_least_one(tokens)
                + _regularizer(self.prepared, self.spec.grad_accum())
            ).backward()
        return total.detach()

    def finish_step(self, step: int) -> None:
        import torch

        if not self.prepared.steps_in_backward:
            if self.spec.train.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.trainable, self.spec.train.max_grad_norm)
            self.optimizer.step()
        if self.prepared.after_step:
            self.prepared.after_step(step)
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, path: Path, step: int) -> None:
        import torch

        if self.rank == 0:
            save_adapter(self.model, path / ADAPTER_DIR, self.spec)
            trainable = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
            torch.save(
                {"step": step, "trainable": trainable, "optimizer": self.optimizer.state_dict()}, path / STATE_FILE
            )
        save_rng(path, self.rank)

    def load(self, path: Path) -> int:
        import torch

        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        params = dict(self.model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state["trainable"]]
        if missing:
            raise RuntimeError(f"checkpoint {path} lacks trainable parameters {missing[:3]}...")
        with torch.no_grad():
            for n, t in state["trainable"].items():
                params[n].copy_(t.to(params[n].device))
        self.optimizer.load_state_dict(state["optimizer"])
        load_rng(path, self.rank)
        return int(state["step"])


class DeepSpeedEngine:
    """DeepSpeed ZeRO 1/2/3 (with optional CPU offload) around the method's own optimizer."""

    def __init__(self, spec: JobSpec, prepared: Prepared, rank: int, world: int, device, config: dict[str, Any]):
        import deepspeed  # imported in the worker only (it probes accelerators at import)

        self.spec, self.prepared, self.rank, self.world = spec, prepared, rank, world
        self.stage = config["zero_optimization"]["stage"]
        if self.stage == 3:
            from pipelines.model import one_4bit_layout

            one_4bit_layout(prepared.model)  # ZeRO-3 re-gathers the original layout
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=prepared.model, optimizer=prepared.optimizer, config=config, dist_init_required=False
        )
        self.model = prepared.model  # the PEFT model, hooked by the engine (ZeRO-3 gathers on forward)
        # DeepSpeed's checkpoint holds the trainable tensors only: the frozen base is reloaded from the
        # base model on resume, and under ZeRO-3 asking bnb 4-bit layers for their (partitioned) state fails
        self.engine.module_state_dict = self._trainable_state_dict

    def _trainable_state_dict(self, destination=None, prefix="", keep_vars=False, exclude_frozen_parameters=True):
        sd = destination if destination is not None else {}
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                sd[prefix + n] = p if keep_vars else p.detach()
        return sd

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def gather(self):
        """Context in which every trainable parameter is whole on every rank (ZeRO-3 partitions them)."""
        if self.stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(
            [p for p in self.model.parameters() if p.requires_grad], modifier_rank=None
        )

    def micro_step(self, batch: dict, last: bool, tokens: int):
        """As ``TorchEngine.micro_step``; DeepSpeed averages gradients over ranks, and its own 1/accumulation
        scaling is off (the global token count already normalizes). Under ZeRO-3 every rank calls the LM head
        the same number of times (the most a micro-batch can need), as each call gathers its weights, and the
        chunks' logits are kept for backward rather than recomputed (the weights are partitioned again by then)."""
        from pipelines.train.loss import token_loss_sum

        chunk, chunks = self.spec.train.loss_chunk_tokens, None
        if self.stage == 3 and chunk > 0:
            chunks = -(-self.spec.train.micro_batch_size * self.spec.data.max_length // chunk)
        total = token_loss_sum(self.engine, self.model, batch, chunk, chunks, recompute=self.stage < 3)
        self.engine.backward(
            total * self.world / _at_least_one(tokens) + _regularizer(self.prepared, self.spec.grad_accum()),
            scale_wrt_gas=False,
        )
        self.engine.step()  # steps the optimizer (with clipping) only at the accumulation boundary
        return total.detach()

    def finish_step(self, step: int) -> None:
        if self.prepared.after_step:
            self.prepared.after_step(step)

    def save(self, path: Path, step: int) -> None:
        # every rank writes its own optimizer partition; frozen base weights stay out of the checkpoint
        self.engine.save_checkpoint(
            str(path / DS_DIR), tag=DS_TAG, client_state={"raypeft_step": step}, exclude_frozen_parameters=True
        )
        with self.gather():
            if self.rank == 0:  # whole tensors, copied while gathered (not model.state_dict(): see above)
                sd = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}
                save_adapter(self.model, path / ADAPTER_DIR, self.spec, state_dict=sd)
        save_rng(path, self.rank)

    def load(self, path: Path) -> int:
        _, client = self.engine.load_checkpoint(str(path / DS_DIR), tag=DS_TAG, load_module_strict=False)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path / DS_DIR}")
        load_rng(path, self.rank)
        return int(client["raypeft_step"])


STALE_BUILD_S = 600  # a DeepSpeed op builds in about a minute on 2 cores


def stale_build_lock(build_dir: Path, now: float, max_age_s: float = STALE_BUILD_S) -> Path | None:
    """The lock file of a torch C++ extension build that has held it for longer than any build takes.

    torch's ``FileBaton`` creates ``BUILD_DIR/lock`` while one process builds an extension, and every other
    process waits, with no timeout, until it goes away. A build killed midway (Ctrl-C on a run, a worker
    lost) leaves the lock behind, and every later run then hangs there silently."""
    lock = build_dir / "lock"
    try:
        age = now - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    return lock if age > max_age_s else None


def _clear_stale_build_lock(builder_name: str) -> None:
    import time

    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory  # torch's own rule for where an op builds

    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None:
        return
    lock = stale_build_lock(Path(_get_build_directory(builder.NAME, verbose=False)), time.time())
    if lock is not None:
        print(f"[raypeft] removing {lock}: a build of {builder.NAME} was killed midway and left it behind", flush=True)
        with contextlib.suppress(FileNotFoundError):  # another worker removed it first
            lock.unlink()


def deepspeed_setup(config: dict[str, Any] | None, device, quantized: bool = False):
    """Before the base loads: join DeepSpeed to Ray Train's process group, and for ZeRO-3 let
    ``from_pretrained`` partition weights as it loads them. Returns an object to keep alive."""
    if config is None:
        return None
    import deepspeed

    if device.type == "cpu":  # the CPU backend JIT-builds DeepSpeed's shared-memory op on first use
        _clear_stale_build_lock("ShareMemCommBuilder")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    if config["zero_optimization"]["stage"] != 3 or quantized:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(config)


def build_engine(spec: JobSpec, prepared: Prepared, rank: int, world: int, device, ds_config: dict[str, Any] | None):
    """The engine for the spec's ``scaling.strategy`` (``ds_config`` None: plain torch)."""
    if ds_config is None:
        return TorchEngine(spec, prepared, rank, world, device)
    return DeepSpeedEngine(spec, prepared, rank, world, device, ds_config)


def prebuild_ops(log=print) -> str | None:
    """Build the op DeepSpeed JIT-builds when a ZeRO job first joins its process group (on CPU, the
    shared-memory all-reduce: about a minute on 2 cores), into torch's extension cache, so that the first
    ZeRO job does not stall on it. ``make install`` runs this. Returns the op's name, or None when DeepSpeed
    builds nothing on this machine."""
    import io
    import time

    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op  # what init_distributed calls, so exactly what it builds

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return None
    _clear_stale_build_lock("ShareMemCommBuilder")
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's own progress lines
        op = build_shm_op()
    if op is None:
        return None
    log(f"[raypeft] DeepSpeed op {builder.NAME} ready in {time.perf_counter() - t0:.0f}s")
    return builder.NAME
