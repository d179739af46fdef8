"""The method registry's parts that every method module builds on: what a builder returns (``Prepared``),
what a method is (``Method``), the registry, and the helpers builders share. ``pipelines.model.methods`` loads
the built-in methods into it and answers for them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from pipelines.spec import JobSpec


@dataclass
class Prepared:
    """What a method builder hands the training loop."""

    model: Any
    optimizer: torch.optim.Optimizer
    after_step: Callable[[int], None] | None = None  # called after optimizer.step(), before zero_grad()
    steps_in_backward: bool = False  # layerwise optimizers step inside backward hooks
    is_peft: bool = True  # False: full-parameter method (save the whole model)
    # a term added to each optimizer step's loss (once per step: the engines add 1/accumulation of it per
    # micro-step), for a method whose model adds it to ``outputs.loss`` only when given labels (AdaLoRA)
    regularizer: Callable[[], Any] | None = None


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    build: Callable[[JobSpec, Any], Prepared]
    problems: Callable[[JobSpec], list[tuple[str, str]]] = field(default=lambda spec: [])
    needs_quantization: str | None = None  # "4bit" for qlora/qdora
    # the PEFT config a spec builds (None: not a PEFT method); the driver builds it on a meta model first
    peft_config: Callable[[JobSpec, Any], Any] | None = None


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} registered twice")
    REGISTRY[method.name] = method
    return method


def config_problem(spec: JobSpec, error: Exception, who: str) -> tuple[str, str]:
    """A PEFT config class's complaint about ``method.args`` as a spec problem naming the argument it is about."""
    message = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    key = next((k for k in spec.method.args if k in message), None)
    field = f"method.args.{key}" if key else "method.args"
    value = spec.method.args[key] if key else dict(spec.method.args)
    return field, f"{who} rejected it: {message} (got {value!r})"


def prefix_dropout_problems(spec: JobSpec, dropout: float) -> list[tuple[str, str]]:
    """``data.share_prefix: true`` with an adapter dropout of ``dropout`` that acts on every token: refused. The
    prefix is computed once per micro-batch, so one dropout mask would serve every example's copy of it, where a
    padded batch draws one per example: not the same gradient (``attention.batch_layout`` decides the unset case
    from the built model)."""
    if not (spec.data.share_prefix and dropout > 0):
        return []
    why = (
        f"method.dropout is {dropout!r}, and a shared prefix is computed once per micro-batch, so all its examples "
        "would share one dropout mask on it (a padded batch draws one per example)"
    )
    return [("data.share_prefix", f"{why}: set method.dropout: 0 or unset data.share_prefix (got true)")]


def adamw(params, spec: JobSpec):
    import torch

    return torch.optim.AdamW(params, lr=spec.train.lr, weight_decay=spec.train.weight_decay)


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]
