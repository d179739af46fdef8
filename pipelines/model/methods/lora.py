"""The LoRA family: LoRA, rsLoRA, LoRA+, DoRA, and their 4-bit-base variants QLoRA / QDoRA.

They differ only in a few ``LoraConfig`` switches, the optimizer (LoRA+), and
whether the base is k-bit (QLoRA/QDoRA: ``prepare_model_for_kbit_training``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipelines.model.loading import CHECKPOINTING
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


def lora_config(spec: JobSpec, **switches: Any):
    from peft import LoraConfig

    m = spec.method
    target = m.target_modules
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=spec.rank(),
        lora_alpha=spec.alpha(),
        lora_dropout=m.dropout,
        target_modules=target if isinstance(target, str) else list(target),
        rank_pattern=dict(m.rank_pattern),
        alpha_pattern=dict(m.alpha_pattern),
        **{**m.args, **switches},
    )


def _peft_wrap(spec: JobSpec, model, **switches):
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # checkpointing: below
    if spec.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=CHECKPOINTING)
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(spec, **switches))


def _builder(**switches):
    def build(spec: JobSpec, model) -> Prepared:
        peft_model = _peft_wrap(spec, model, **switches)
        return Prepared(peft_model, adamw(trainable(peft_model), spec))

    return build


def _build_lora_plus(spec: JobSpec, model) -> Prepared:
    import torch
    from peft.optimizers import create_loraplus_optimizer

    peft_model = _peft_wrap(spec, model)
    opt = create_loraplus_optimizer(
        peft_model,
        torch.optim.AdamW,
        lr=spec.train.lr,
        loraplus_lr_ratio=spec.method.loraplus_ratio,
        weight_decay=spec.train.weight_decay,
    )
    return Prepared(peft_model, opt)


def _args_problems(spec: JobSpec) -> list[tuple[str, str]]:
    return prefix_dropout_problems(spec, spec.method.dropout) + _lora_args_problems(spec)


def _lora_args_problems(spec: JobSpec) -> list[tuple[str, str]]:
    if not spec.method.args:
        # LoraConfig raises only on fields that args alone can set (layers_to_transform/_pattern, lora_bias,
        # init_lora_weights, megatron_config); the rest are bounded by the spec's schema and target checks.
        # Skipping PEFT's import (~5 s) here lets a bad spec be refused in well under a second
        # (tests/unit/test_methods.py draws the sections this relies on).
        return []
    from dataclasses import fields

    from peft import LoraConfig

    known = {f.name for f in fields(LoraConfig)}
    reserved = {
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "rank_pattern",
        "alpha_pattern",
        "use_dora",
        "use_rslora",
        "task_type",
    }
    out = []
    for k, v in spec.method.args.items():
        if k in reserved:
            out.append((f"method.args.{k}", f"set through the method section or method name, not args (got {v!r})"))
        elif k not in known:
            out.append((f"method.args.{k}", f"not a LoraConfig field (got {v!r})"))
    if not out:
        try:
            lora_config(spec)
        except (ValueError, TypeError) as e:
            out.append(config_problem(spec, e, "LoraConfig"))
    return out


def _config_of(**switches):
    return lambda spec, model: lora_config(spec, **switches)


for _name, _summary, _build, _q, _switches in (
    ("lora", "LoRA: low-rank update B·A, scale alpha/r", _builder(), None, {}),
    ("rslora", "rank-stabilized LoRA: scale alpha/sqrt(r)", _builder(use_rslora=True), None, {"use_rslora": True}),
    ("lora_plus", "LoRA+: B learns at loraplus_ratio × A's learning rate", _build_lora_plus, None, {}),
    ("dora", "DoRA: weight-decomposed LoRA (magnitude + direction)", _builder(use_dora=True), None, {"use_dora": True}),
    ("qlora", "QLoRA: LoRA on a bitsandbytes NF4 (double-quant) base", _builder(), "4bit", {}),
    ("qdora", "QDoRA: DoRA on a bitsandbytes NF4 base", _builder(use_dora=True), "4bit", {"use_dora": True}),
):
    register(
        Method(_name, _summary, _build, _args_problems, needs_quantization=_q, peft_config=_config_of(**_switches))
    )
