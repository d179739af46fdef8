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

from typing import TYPE_CHECKING, Any

from pipelines.model.methods.base import (  # noqa: F401 - the registry's public names
    REGISTRY,
    Method,
    Prepared,
    adamw,
    config_problem,
    register,
    trainable,
)
from pipelines.spec import register_check

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.spec import JobSpec


def _load_builtin() -> None:
    if REGISTRY:
        return
    from pipelines.model.methods import adalora, galore, lora  # noqa: F401  (they register themselves)


def get_method(name: str) -> Method:
    """Return the registered method, or a generic PEFT builder for any other PEFT type name."""
    _load_builtin()
    if name in REGISTRY:
        return REGISTRY[name]
    from peft import PeftType

    from pipelines.model.methods.generic import generic_method

    try:
        return generic_method(name)
    except KeyError:
        known = sorted(set(REGISTRY) | {t.name.lower() for t in PeftType})
        raise KeyError(f"unknown method (got {name!r}); known: {', '.join(known)}") from None


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


def prompt_learning(name: str) -> bool:
    from peft import PromptLearningConfig

    from pipelines.model.methods.generic import config_class

    try:
        return issubclass(config_class(name), PromptLearningConfig)
    except KeyError:
        return False


def build(spec: JobSpec, model: Any) -> Prepared:
    """Build the trainable model + optimizer for ``spec.method`` on ``model``."""
    return get_method(spec.method.name).build(spec, model)


register_check(method_problems)  # every validate runs it: the spec itself asks no method anything
