"""Fine-tuning methods: a small registry of builders, one place each.

A builder takes the validated spec and the loaded base model and returns a
``Prepared``: the trainable model, its optimizer, and an optional hook called
after every optimizer step (AdaLoRA's rank reallocation). The training loop
knows nothing about any particular method.

Named methods live in ``lora.py`` (the LoRA family: lora, rslora, lora_plus,
dora, qlora, qdora), ``adalora.py`` and ``galore.py``. Any other PEFT method is
built by ``generic.py`` from its PEFT type name and ``method.args``.
"""

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


def _load_builtin() -> None:
    if REGISTRY:
        return
    from pipelines.methods import adalora, galore, lora  # noqa: F401  (they register themselves)


def get_method(name: str) -> Method:
    """Return the registered method, or a generic PEFT builder for any other PEFT type name."""
    _load_builtin()
    if name in REGISTRY:
        return REGISTRY[name]
    from pipelines.methods.generic import generic_method

    return generic_method(name)


def method_names() -> list[str]:
    _load_builtin()
    return sorted(REGISTRY)


def method_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """Validate the method section (driver side, before anything starts)."""
    try:
        method = get_method(spec.method.name)
    except KeyError as e:
        return [("method.name", str(e.args[0]))]
    problems = list(method.problems(spec))
    q = spec.quantization()
    if method.needs_quantization == "4bit" and q != "nf4":
        problems.append(
            ("model.quantization", f"method {spec.method.name!r} trains on a 4-bit base: use nf4 or auto (got {q!r})")
        )
    if spec.data.packing and prompt_learning(spec.method.name):
        problems.append(
            (
                "data.packing",
                f"method {spec.method.name!r} prepends virtual tokens through the KV cache, which one packed row "
                "would share across its examples: turn packing off (got true)",
            )
        )
    if spec.data.padding_free and prompt_learning(spec.method.name):
        problems.append(
            (
                "data.padding_free",
                f"method {spec.method.name!r} prepends virtual tokens to every row, so its batches need one row per "
                "example: leave data.padding_free unset or false (got true)",
            )
        )
    if spec.data.padding_free is False and spec.data.packing:
        problems.append(
            (
                "data.padding_free",
                "packed rows always run padding-free: unset data.padding_free or data.packing (got false)",
            )
        )
    if spec.data.share_prefix and (spec.data.padding_free is False or prompt_learning(spec.method.name)):
        why = "data.padding_free is false" if spec.data.padding_free is False else f"method {spec.method.name!r} pads"
        problems.append(
            (
                "data.share_prefix",
                f"a shared prefix lives in padding-free rows, and {why}: unset data.share_prefix (got true)",
            )
        )
    return problems


def padding_free(spec, attention_ok: bool) -> bool:
    """Whether micro-batches run padding-free (``data.collate``): ``data.padding_free`` when set, else for
    packed runs, and for unpacked ones when attention can split the row per example (``attention_ok``)
    and the method adds no virtual tokens."""
    if spec.data.padding_free is not None:
        return spec.data.padding_free
    return spec.data.packing or (attention_ok and not prompt_learning(spec.method.name))


def share_prefix(spec, padding_free_rows: bool, varlen: bool) -> bool:
    """Whether micro-batches compute their examples' shared prefix once (``data.collate``): ``data.share_prefix``
    when set, else whenever they can: padding-free rows with raypeft's per-example SDPA (``varlen``,
    ``attention.VARLEN``). ``true`` where they can't is a ``ValueError`` naming the field."""
    can = padding_free_rows and varlen
    if spec.data.share_prefix and not can:
        raise ValueError(
            "data.share_prefix: true needs padding-free rows with raypeft's per-example SDPA (attention.VARLEN), "
            "and this model's attention is not sdpa without a sliding window: unset data.share_prefix (got true)"
        )
    return can and spec.data.share_prefix is not False


def prompt_learning(name: str) -> bool:
    from peft import PromptLearningConfig

    from pipelines.methods.generic import config_class

    try:
        return issubclass(config_class(name), PromptLearningConfig)
    except KeyError:
        return False


def config_problem(spec: JobSpec, error: Exception, who: str) -> tuple[str, str]:
    """A PEFT config class's complaint about ``method.args`` as a spec problem naming the argument it is about."""
    message = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    key = next((k for k in spec.method.args if k in message), None)
    field = f"method.args.{key}" if key else "method.args"
    value = spec.method.args[key] if key else dict(spec.method.args)
    return field, f"{who} rejected it: {message} (got {value!r})"


def build(spec: JobSpec, model: Any) -> Prepared:
    """Build the trainable model + optimizer for ``spec.method`` on ``model``."""
    return get_method(spec.method.name).build(spec, model)


def adamw(params, spec: JobSpec):
    import torch

    return torch.optim.AdamW(params, lr=spec.train.lr, weight_decay=spec.train.weight_decay)


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]
