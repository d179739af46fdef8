"""Any PEFT method by its PEFT type name (loha, lokr, ia3, vera, vblora, hra, waveft, prompt_tuning, ...).

The config class comes from PEFT's own registry. ``method.r`` / ``alpha`` /
``dropout`` / ``target_modules`` are passed where the class has a matching field;
everything else comes from ``method.args``, checked against the class's fields.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any

from pipelines.model.loading import CHECKPOINTING
from pipelines.model.methods.base import Method, Prepared, adamw, config_problem, prefix_dropout_problems, trainable

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.spec import JobSpec

_ALPHA_FIELDS = ("lora_alpha", "alpha")


def dropout_field(cls) -> str | None:
    """The config field of a PEFT class that ``method.dropout`` sets: ``lora_dropout``, ``<type>_dropout``
    (``vera_dropout``, ``boft_dropout``, ...), else ``module_dropout`` (OFT, LoHa, LoKr), else None."""
    names = [f.name for f in fields(cls)]
    own = [n for n in names if n.endswith("_dropout") and n not in ("rank_dropout", "module_dropout")]
    return (own or [n for n in names if n == "module_dropout"] or [None])[0]


def config_class(name: str):
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PeftType

    try:
        peft_type = PeftType[name.upper()]
    except KeyError:
        raise KeyError(f"unknown method (got {name!r})") from None  # pipelines.model.methods.get_method names the known
    return PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]


def linear_suffixes(model) -> list[str]:
    """Distinct last names of the model's nn.Linear modules, lm_head excluded."""
    import torch

    return sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lm_head" not in n
        }
    )


def peft_config(spec: JobSpec, model=None):
    cls = config_class(spec.method.name)
    names = {f.name for f in fields(cls)}
    m = spec.method
    kwargs: dict[str, Any] = {}
    if "task_type" in names:
        kwargs["task_type"] = "CAUSAL_LM"
    if "r" in names:
        kwargs["r"] = spec.rank()
    for f in _ALPHA_FIELDS:
        if f in names and m.alpha is not None:
            kwargs[f] = m.alpha
            break
    if "target_modules" in names:
        target = m.target_modules if isinstance(m.target_modules, str) else list(m.target_modules)
        if target == "all-linear" and "feedforward_modules" in names and model is not None:
            # PEFT expands all-linear into full module names, then rejects its own saved
            # config because feedforward_modules ({'down_proj'}) is not a subset of them
            target = linear_suffixes(model)
        kwargs["target_modules"] = target
    drop = dropout_field(cls)
    if drop and "dropout" in m.model_fields_set:  # unset: the class's own default
        kwargs[drop] = m.dropout
    for key, pattern in (("rank_pattern", m.rank_pattern), ("alpha_pattern", m.alpha_pattern)):
        if pattern and key in names:
            kwargs[key] = dict(pattern)
    kwargs.update(m.args)
    return cls(**kwargs)


def _build(spec: JobSpec, model) -> Prepared:
    from peft import get_peft_model

    if spec.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=CHECKPOINTING)
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, peft_config(spec, model))
    return Prepared(peft_model, adamw(trainable(peft_model), spec))


def _problems(spec: JobSpec) -> list[tuple[str, str]]:
    try:
        cls = config_class(spec.method.name)
    except KeyError as e:
        return [("method.name", e.args[0])]
    names = {f.name for f in fields(cls)}
    out = [
        (f"method.args.{k}", f"not a {cls.__name__} field (got {v!r})")
        for k, v in spec.method.args.items()
        if k not in names
    ]
    drop = dropout_field(cls)
    if "dropout" in spec.method.model_fields_set and drop is None:
        out.append(("method.dropout", f"{spec.method.name} has no dropout (got {spec.method.dropout!r})"))
    elif drop is not None:  # set: method.dropout; unset: the class's own default
        acting = (
            spec.method.dropout if "dropout" in spec.method.model_fields_set else cls.__dataclass_fields__[drop].default
        )
        out += prefix_dropout_problems(spec, float(acting or 0))
    if spec.method.rank_pattern and "rank_pattern" not in names:
        out.append(
            ("method.rank_pattern", f"{spec.method.name} has no rank_pattern (got {spec.method.rank_pattern!r})")
        )
    if not out:
        try:
            peft_config(spec)
        except (ValueError, TypeError) as e:
            out.append(config_problem(spec, e, cls.__name__))
    return out


def generic_method(name: str) -> Method:
    config_class(name)  # raises KeyError for a name PEFT doesn't know
    return Method(name, f"PEFT {name}", _build, _problems, peft_config=peft_config)
