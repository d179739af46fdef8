"""GaLore (galore-torch): full-parameter training with low-rank gradient projection.

Variants: ``galore`` (GaLoreAdamW), ``galore_8bit`` (GaLoreAdamW8bit, bitsandbytes
8-bit states) and ``galore_layerwise`` (one optimizer per parameter, stepped in a
post-accumulate-grad hook, so full gradients never coexist in memory).
The projected parameters are the 2-D weights of the target linear modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.model.loading import CHECKPOINTING
from pipelines.model.methods.base import Method, Prepared, register

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.spec import JobSpec


def galore_param_groups(spec: JobSpec, model) -> list[dict]:
    import torch

    from pipelines.spec import is_target

    g = spec.method.galore
    galore_params, regular = [], []
    targeted = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and is_target(spec.method.target_modules, mod_name):
            targeted.add(id(mod.weight))
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (galore_params if id(p) in targeted and p.dim() == 2 else regular).append(p)
    galore_group = {
        "params": galore_params,
        "rank": g.rank,
        "update_proj_gap": g.update_proj_gap,
        "scale": g.scale,
        "proj_type": g.proj_type,
    }
    return [{"params": regular}, galore_group]


class LayerwiseOptimizer:
    """Facade over per-parameter optimizers stepped in backward hooks.

    ``param_groups`` are the inner optimizers' own group dicts, so an LR scheduler
    that edits them drives every inner optimizer.
    """

    def __init__(self, optimizers: dict):
        self.optimizers = optimizers
        self.param_groups = [grp for opt in optimizers.values() for grp in opt.param_groups]
        self.defaults = {}
        self.state = {}

    def step(self, closure=None):  # stepping happened in the hooks
        return None

    def zero_grad(self, set_to_none: bool = True):
        return None

    def state_dict(self):
        return {i: opt.state_dict() for i, opt in enumerate(self.optimizers.values())}

    def load_state_dict(self, state):
        for i, opt in enumerate(self.optimizers.values()):
            opt.load_state_dict(state[i])


def _builder(variant: str):
    def build(spec: JobSpec, model) -> Prepared:
        from galore_torch import GaLoreAdamW, GaLoreAdamW8bit

        if spec.model.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=CHECKPOINTING)
        groups = galore_param_groups(spec, model)
        cls = GaLoreAdamW8bit if variant == "galore_8bit" else GaLoreAdamW
        kw = dict(lr=spec.train.lr, weight_decay=spec.train.weight_decay)
        if variant != "galore_layerwise":
            return Prepared(model, cls(groups, **kw), is_peft=False)

        galore_ids = {id(p) for p in groups[1]["params"]}
        extra = {k: v for k, v in groups[1].items() if k != "params"}
        optimizers = {}
        for p in (q for grp in groups for q in grp["params"]):
            group = {"params": [p], **(extra if id(p) in galore_ids else {})}
            optimizers[p] = cls([group], **kw)

        def hook(param):
            optimizers[param].step()
            optimizers[param].zero_grad()

        for p in optimizers:
            p.register_post_accumulate_grad_hook(hook)
        return Prepared(model, LayerwiseOptimizer(optimizers), steps_in_backward=True, is_peft=False)  # type: ignore[arg-type]

    return build


def _problems(variant: str):
    def problems(spec: JobSpec) -> list[tuple[str, str]]:
        out = []
        if spec.quantization() != "none":
            out.append(
                (
                    "model.quantization",
                    f"{variant} trains full-precision weights; use none (got {spec.quantization()!r})",
                )
            )
        if spec.method.args:
            out.append(("method.args", f"{variant} takes its settings from method.galore (got {spec.method.args!r})"))
        if variant == "galore_layerwise":
            if spec.grad_accum() != 1:
                field = "train.global_batch_size" if spec.train.global_batch_size else "train.grad_accum"
                out.append(
                    (
                        field,
                        f"galore_layerwise steps inside backward, so it cannot accumulate; use 1 micro-batch per step (got {spec.grad_accum()} micro-batches)",
                    )
                )
            if spec.scaling.num_workers != 1:
                out.append(
                    (
                        "scaling.num_workers",
                        f"galore_layerwise is single-worker (per-parameter hooks bypass DDP's reducer); use 1 (got {spec.scaling.num_workers})",
                    )
                )
        if variant == "galore_8bit" and not spec.scaling.use_gpu:
            out.append(
                (
                    "method.name",
                    "galore_8bit needs bitsandbytes' CUDA 8-bit optimizer kernels; on CPU use galore or galore_layerwise (got 'galore_8bit')",
                )
            )
        return out

    return problems


for _v, _s in (
    ("galore", "GaLore: full-parameter AdamW with low-rank gradient projection"),
    ("galore_8bit", "GaLore with 8-bit AdamW states (bitsandbytes, GPU)"),
    ("galore_layerwise", "GaLore, one optimizer per parameter stepped during backward"),
):
    register(Method(_v, _s, _builder(_v), _problems(_v)))
