"""AdaLoRA: SVD-shaped LoRA whose rank budget is reallocated during training.

``update_and_allocate(step)`` must run after every optimizer step; the builder
returns it as the ``after_step`` hook so the loop really calls it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

from pipelines.model.methods.base import (
    Method,
    Prepared,
    adamw,
    config_problem,
    prefix_dropout_problems,
    register,
    trainable,
)

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.spec import JobSpec


def adalora_config(spec: JobSpec):
    from peft import AdaLoraConfig

    m, steps = spec.method, spec.train.max_steps
    init_r = spec.rank()
    kwargs = dict(
        task_type="CAUSAL_LM",
        init_r=init_r,
        target_r=max(1, init_r // 2),
        lora_alpha=spec.alpha(),
        lora_dropout=m.dropout,
        target_modules=m.target_modules if isinstance(m.target_modules, str) else list(m.target_modules),
        total_step=steps,
        tinit=max(0, steps // 10),
        tfinal=max(0, steps // 5),
        deltaT=1,
    )
    kwargs.update(m.args)
    return AdaLoraConfig(**kwargs)


def _build(spec: JobSpec, model) -> Prepared:
    from peft import get_peft_model

    peft_model = get_peft_model(model, adalora_config(spec))
    inner = peft_model.base_model

    def after_step(step: int) -> None:
        inner.update_and_allocate(step)

    return Prepared(
        peft_model, adamw(trainable(peft_model), spec), after_step=after_step, regularizer=orth_regularizer(inner)
    )


def orth_regularizer(inner):
    """AdaLoRA's orthogonal regularization of P and Q (``orth_reg_weight`` × the mean Frobenius distance of
    PᵀP and QQᵀ from I), exactly as ``AdaLoraModel.forward`` adds it to ``outputs.loss``: it does so only
    when the forward computes a loss from labels, and raypeft's engines compute the loss themselves."""

    def regularizer():
        import torch
        from peft.utils.integrations import gather_params_ctx

        name = inner.trainable_adapter_name
        terms = []
        for n, p in inner.model.named_parameters():
            if ("lora_A" in n or "lora_B" in n) and name in n:
                with gather_params_ctx(p, fwd_module=inner) if p.shape == torch.Size([0]) else nullcontext():
                    cov = p @ p.T if "lora_A" in n else p.T @ p
                eye = torch.eye(*cov.size(), dtype=cov.dtype, device=cov.device)
                terms.append(torch.norm(cov - eye, p="fro"))
        weight = inner.peft_config[name].orth_reg_weight
        return weight * (torch.stack(terms).mean() if terms else torch.zeros(()))

    return regularizer


def _problems(spec: JobSpec) -> list[tuple[str, str]]:
    from dataclasses import fields

    from peft import AdaLoraConfig

    known = {f.name for f in fields(AdaLoraConfig)}
    out = prefix_dropout_problems(spec, spec.method.dropout) + [
        (f"method.args.{k}", f"not an AdaLoraConfig field (got {v!r})")
        for k, v in spec.method.args.items()
        if k not in known
    ]
    if not out:
        try:
            adalora_config(spec)
        except (ValueError, TypeError) as e:
            out.append(config_problem(spec, e, "AdaLoraConfig"))
    if spec.scaling.num_workers > 1:
        out.append(
            (
                "scaling.num_workers",
                f"adalora reallocates ranks per rank-local importance; use 1 worker (got {spec.scaling.num_workers})",
            )
        )
    return out


register(
    Method(
        "adalora",
        "AdaLoRA: adaptive rank allocation (update_and_allocate every step)",
        _build,
        _problems,
        peft_config=lambda spec, model: adalora_config(spec),
    )
)
