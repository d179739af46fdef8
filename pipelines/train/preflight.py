"""Pre-flight checks on the built model, before any training step.

They verify the checklist that careful fine-tuners run by hand:

* the base is frozen: every trainable parameter belongs to the adapter (full-parameter
  methods such as GaLore are exempt);
* the optimizer holds exactly the trainable parameters (nothing frozen, nothing missing);
* every ``target_modules`` entry matched at least one module of the architecture;
* LoRA B is zero at init, so step 0 equals the base model (unless another
  ``init_lora_weights`` was asked for);
* the base's weights have the dtype and quantization the spec asks for.

``preflight(spec, prepared, base_module_names)`` returns the problems and a short
summary; it reads tensors and names only (no Ray, no I/O), so it runs in the
training worker before step 0 and in ``raypeft check``.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.model import module_names  # noqa: F401 - the pre-flight's input, named here too
from pipelines.spec import missing_targets_message, quote, target_matches

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.model import Prepared
    from pipelines.spec import JobSpec, TunedJobSpec


class PreflightError(RuntimeError):
    """The built model failed a pre-flight check. ``problems`` lists every failure."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("pre-flight check failed:\n" + "\n".join(f"  - {p}" for p in problems))

    def __reduce__(self):  # picklable across Ray processes
        return (PreflightError, (self.problems,))


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    trainable: int = 0
    total: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)  # trainable parameters per adapter tensor kind
    matched: dict[str, int] = field(default_factory=dict)  # target_modules entry → modules matched

    def summary(self) -> str:
        pct = 100 * self.trainable / max(self.total, 1)
        kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(self.by_kind.items(), key=lambda kv: -kv[1]))
        lines = [
            f"trainable {self.trainable:,} / {self.total:,} parameters ({pct:.3f}%)" + (f": {kinds}" if kinds else "")
        ]
        if self.matched:
            lines.append("target modules: " + ", ".join(f"{k} ×{v}" for k, v in self.matched.items()))
        return "\n".join(lines)


def _kind(name: str, adapter: str) -> str:
    """``base_model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` → ``lora_A``."""
    parts = name.split(".")
    if adapter in parts:
        i = parts.index(adapter)
        return parts[i - 1] if i > 0 else adapter
    return parts[-1]


def preflight(spec: JobSpec, prepared: Prepared, base_module_names: list[str]) -> Report:
    """Check ``prepared`` (built from ``spec``) against the checklist above.

    Args:
        spec: the validated job spec.
        prepared: what the method builder returned (model, optimizer, ...).
        base_module_names: module names of the base model *before* the adapter was attached.
    """
    import torch

    model, rep = prepared.model, Report()
    quantization = _quantization_problems(spec, model)  # dtype and quantization as specified: listed last
    params = list(model.named_parameters())
    rep.total = sum(p.numel() for _, p in params)
    trainable = [(n, p) for n, p in params if p.requires_grad]
    rep.trainable = sum(p.numel() for _, p in trainable)
    if not trainable:
        rep.problems.append("no trainable parameters: the method attached nothing to train")

    adapter = getattr(model, "active_adapter", None) if prepared.is_peft else None
    if isinstance(adapter, list):
        adapter = adapter[0]
    if prepared.is_peft and adapter:
        leaked = [n for n, _ in trainable if adapter not in n.split(".")]
        if leaked:
            rep.problems.append(
                f"the base is not frozen: {len(leaked)} trainable parameter(s) outside adapter {adapter!r}, "
                f"e.g. {leaked[0]!r}"
            )
        for n, p in trainable:
            k = _kind(n, adapter)
            rep.by_kind[k] = rep.by_kind.get(k, 0) + p.numel()

    # the optimizer holds exactly the trainable parameters
    in_opt = {id(p) for g in prepared.optimizer.param_groups for p in g["params"]}
    frozen_in_opt = [n for n, p in params if id(p) in in_opt and not p.requires_grad]
    if frozen_in_opt:
        rep.problems.append(f"the optimizer holds {len(frozen_in_opt)} frozen parameter(s), e.g. {frozen_in_opt[0]!r}")
    not_in_opt = [n for n, p in trainable if id(p) not in in_opt]
    if not_in_opt:
        rep.problems.append(
            f"{len(not_in_opt)} trainable parameter(s) are not in the optimizer and would never change, e.g. {not_in_opt[0]!r}"
        )
    if spec.method.name.startswith("galore"):  # the projected group must hold the target 2-D weights
        projected = [p for g in prepared.optimizer.param_groups if "rank" in g for p in g["params"]]
        if not projected:
            rep.problems.append(
                "GaLore's projected parameter group is empty: no 2-D weight of the target modules is trainable"
            )
        rep.by_kind = {
            "galore (projected)": sum(p.numel() for p in projected),
            "other": rep.trainable - sum(p.numel() for p in projected),
        }

    # every target_modules entry matched something
    rep.matched = target_matches(spec.method.target_modules, base_module_names)
    missing = [t for t, n in rep.matched.items() if n == 0]
    if missing:
        rep.problems.append(f"method.target_modules: {missing_targets_message(missing, base_module_names)}")

    # LoRA B starts at zero (the adapter is a no-op at step 0) unless another init was asked for
    # (AdaLoRA's no-op factor is its singular values E; A and B start random)
    init = spec.method.args.get("init_lora_weights", True)
    peft_type = str(getattr(getattr(model, "peft_config", {}).get(adapter), "peft_type", "")) if adapter else ""
    zero_factor = {
        "PeftType.LORA": ".lora_B.",
        "LORA": ".lora_B.",
        "PeftType.ADALORA": ".lora_E.",
        "ADALORA": ".lora_E.",
    }.get(peft_type)
    if zero_factor and init is True:
        nonzero = [n for n, p in trainable if zero_factor in n and p.numel() and bool(torch.count_nonzero(p.detach()))]
        if nonzero:
            rep.problems.append(
                f"LoRA {zero_factor.strip('.').split('_')[1]} is not zero at init in {len(nonzero)} module(s), e.g. {nonzero[0]!r}"
            )

    rep.problems += quantization
    return rep


def _quantization_problems(spec: JobSpec, model) -> list[str]:
    import torch

    out: list[str] = []
    q = spec.quantization()
    kinds: dict[str, int] = {}
    import bitsandbytes as bnb

    for _, mod in model.named_modules():
        cls = type(mod).__name__
        if isinstance(mod, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            kinds[cls] = kinds.get(cls, 0) + 1
            if cls == "Linear4bit":
                qs = getattr(mod.weight, "quant_state", None)
                if q == "nf4" and qs is not None and qs.quant_type != "nf4":
                    out.append(f"model.quantization: a 4-bit layer uses {qs.quant_type!r}, not 'nf4'")
    if spec.model.quantization_plan:  # a mixed base: every linear at the bit-width the plan gives it
        return _plan_problems(spec, model)
    want = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}.get(q)
    if want and not kinds.get(want):
        out.append(f"model.quantization: {q!r} was asked for, but the model has no bitsandbytes {want} layer")
    if q == "none" and kinds:
        out.append(f"model.quantization: 'none' was asked for, but the model has quantized layers {kinds}")
    dtype = getattr(torch, spec.model.dtype)  # the spec's dtypes are torch's names
    wrong = [
        n
        for n, p in model.named_parameters()
        if not p.requires_grad
        and p.is_floating_point()
        and p.dtype != dtype
        and type(p).__name__ not in ("Params4bit", "Int8Params")
        and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and q == "none"
    ]
    if wrong:
        out.append(f"model.dtype: {len(wrong)} base weight(s) are not {spec.model.dtype}, e.g. {wrong[0]!r}")
    return out


def check(spec: JobSpec, prepared: Prepared, base_module_names: list[str]) -> Report:
    """Run ``preflight`` and raise ``PreflightError`` on any problem; return the report otherwise."""
    rep = preflight(spec, prepared, base_module_names)
    if rep.problems:
        raise PreflightError(rep.problems)
    return rep


def architecture_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """Driver-side, before Ray starts, on the base architecture built on the meta device (no weights are
    read): every ``target_modules`` entry must match a linear layer, and PEFT must accept the method's
    config on this model (``get_peft_model`` on meta), so a worker never meets a complaint the driver could
    have raised. A base whose config cannot be read here (a hub id without network) is left to the worker."""
    import torch

    try:
        from pipelines.model import meta_model

        model = meta_model(spec.model)
    except Exception:  # noqa: BLE001 - the worker's pre-flight checks it with the real model
        return []
    names = [n for n, _ in model.named_modules()]
    linears = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
    target = spec.method.target_modules
    missing = [t for t, n in target_matches(target, linears).items() if n == 0]
    if missing:
        others = [t for t, n in target_matches(target, names).items() if n and t in missing]
        why = f"; {others!r} match only non-linear modules" if others else ""
        message = missing_targets_message(missing, linears, "linear layer")
        return [("method.target_modules", f"{message}{why} (got {target!r})")]
    return _peft_problems(spec, model)


def _peft_problems(spec: JobSpec, model) -> list[tuple[str, str]]:
    """What PEFT says when it wraps the meta model with the spec's config, as spec problems naming the field."""
    from pipelines.model import get_method

    method = get_method(spec.method.name)
    if method.peft_config is None:
        return []
    from peft import get_peft_model

    try:
        get_peft_model(model, method.peft_config(spec, model))
    except (ValueError, TypeError, KeyError, IndexError, re.error) as e:
        from pipelines.model import config_problem

        field, message = config_problem(spec, e, f"PEFT ({spec.method.name} on this base)")
        if field == "method.args" and not spec.method.args:
            field = "method.name"
            message = message.replace("(got {})", f"(got {spec.method.name!r})")
        return [(field, message)]
    except Exception:  # noqa: BLE001 - a limit of the meta device, not of the spec: the worker builds it for real
        return []
    return []


def load_checked_spec(path, overrides=(), check_urls: bool = True) -> JobSpec:
    """``load_spec`` plus ``architecture_problems``: everything checkable before Ray starts. ``check_urls=False``
    leaves URL data sources to the job's own driver (``raypeft submit`` runs where the cluster can see them).

    Raises:
        SpecError: listing every problem (the CLI exits 2).
    """
    from pipelines.spec import load_spec
    from pipelines.spec.job import SpecError

    spec = load_spec(path, overrides, check_urls=check_urls)
    problems = architecture_problems(spec) + split_problems(spec.data) + storage_problems(spec)
    if not problems:
        problems = sample_problems(spec)
    if problems:
        raise SpecError(problems)
    for warning in data_warnings(spec):
        print(f"[raypeft] warning: {warning}", file=sys.stderr)
    return spec


def load_tuned(path, overrides=()) -> TunedJobSpec:
    """Read, override and validate a tuned job spec (its ``tune`` section required), target modules checked
    against the base: everything checkable before Ray starts (``raypeft tune``, ``layerwise``, ``validate``)."""
    from pipelines.spec import load_file
    from pipelines.spec.job import SpecError, resolve_paths
    from pipelines.spec.tune import validate

    spec = load_file(path, overrides, lambda raw: validate(resolve_paths(raw)))
    problems = architecture_problems(spec) + split_problems(spec.data)
    if problems:
        raise SpecError(problems)
    return spec


def storage_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """Before Ray, on the driver: a local ``checkpoint.storage`` where no directory can be made. A directory is
    made in it (or its nearest existing parent) and removed at once; permissions alone don't say it (root
    may write anywhere but in /proc)."""
    import tempfile

    storage = spec.checkpoint.storage
    if not storage or "://" in storage:
        return []
    p = Path(os.path.expanduser(storage))
    where = p if p.is_dir() else next((a for a in p.parents if a.is_dir()), None)
    if where is None:  # the spec's own check names it
        return []
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".raypeft-check-", dir=where))
    except OSError as e:
        return [
            (
                "checkpoint.storage",
                f"is not writable: can't make a directory in {where} ({e.strerror}) (got {quote(storage)})",
            )
        ]
    return []


def _as_problem(e: Exception) -> tuple[str, str]:
    """A ``DataError`` worded ``FIELD: message`` as a spec problem."""
    field, _, message = str(e).partition(": ")
    return field, message


def split_problems(data, max_json_bytes: int = 64 << 20) -> list[tuple[str, str]]:
    """Before Ray: a named split its source lacks (``data.train_split``/``data.eval_split``), and a
    ``data.eval`` that is the training records. A JSON file over ``max_json_bytes`` is left to ``prepare``."""
    from pipelines import data as D

    problems = []
    for where, source, name in (
        ("data.train", data.train, data.train_split),
        ("data.eval", data.eval, data.eval_split),
    ):
        if source is None:
            continue
        p = Path(os.path.expanduser(source))
        if p.suffix == ".json" and p.is_file() and p.stat().st_size > max_json_bytes:
            continue
        try:
            D.check_split(source, name, where)
        except D.DataError as e:
            problems.append(_as_problem(e))
        except (OSError, ValueError):  # unreadable or not JSON: the data checks name it
            continue
    same = D.eval_is_train_problem(data)
    if same:
        problems.append(("data.eval", same))
    return problems


SAMPLE_RECORDS = 64


def sample_problems(spec: JobSpec, n: int = SAMPLE_RECORDS) -> list[tuple[str, str]]:
    """Before Ray: a local base's tokenizer, loaded as the workers load it, and the first ``n`` records of
    each local source, read by the reader ``prepare`` uses and formatted and tokenized as it will: an
    empty source, a record that is not JSON or does not match ``data.format`` (unless
    ``data.skip_invalid``), and a sample none of whose records keeps a completion token within
    ``data.max_length``. The full pass on Ray Data still checks every record. URLs, builtin datasets and a
    hub base that cannot be reached from here are left to the job."""
    from pipelines import data as D
    from pipelines.data.prepare import _global_where, eval_source, plan_chunks, read_chunk

    d = spec.data
    sources = [("data.train", d.train, "train", d.train_split)]
    if d.eval is not None:
        sources.append(("data.eval", eval_source(spec), "eval", d.eval_split))
    local = [x for x in sources if "://" not in x[1] and not x[1].startswith("builtin:")]
    base_dir = Path(os.path.expanduser(spec.model.base)).is_dir()
    if not local and not base_dir:
        return []
    try:
        from pipelines.model import load_tokenizer, resolve_base

        tok = load_tokenizer(resolve_base(spec.model, lambda *_: None), spec.model.revision)
    except Exception as e:  # noqa: BLE001 - a local base the workers could not load either: say so now
        if base_dir:  # (a hub id without network is left to the workers, which may reach the hub)
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            return [("model.base", f"its tokenizer cannot be loaded ({why}) (got {quote(spec.model.base)})")]
        return []
    out: list[tuple[str, str]] = []
    for where_, source, role, name in local:
        try:
            chunks = plan_chunks(source, role, 1024, name)
        except D.DataError as e:  # a missing split: named by its own setting
            out.append(_as_problem(e))
            continue
        except Exception:  # noqa: BLE001 - unreadable: the full pass names it with its position
            continue
        sample: list[tuple[str, object]] = []
        for where, rec in read_chunk(chunks[0]):
            if rec is not None:
                sample.append((where, rec))
            if len(sample) == n:
                break
        if not sample:
            if len(chunks) == 1:
                out.append((where_, f"has no records (got {quote(source)})"))
            continue
        usable, bad = 0, None
        for where, rec in sample:
            if isinstance(rec, D.DataError):
                bad = bad or (where, str(rec))
                continue
            try:
                ids, masked = D.encode_ids([rec], d.format, tok, d.max_length)[0]
            except D.FormatError as e:
                bad = bad or (where, str(e))
                continue
            usable += len(ids) > masked
        if bad and not d.skip_invalid:  # worded as the full pass words it, with the record's place in the file
            where, why = bad
            out.append(
                (
                    where_,
                    f"bad record(s): {_global_where(chunks[0], where, 0)}: {why}; fix the data or set "
                    f"data.skip_invalid: true to skip such records (got {quote(source)})",
                )
            )
        elif usable == 0:
            out.append(
                (
                    "data.max_length",
                    f"none of the first {len(sample)} records of {where_} keeps a completion token within "
                    f"{d.max_length} tokens: raise it, or check data.format (got {d.max_length})",
                )
            )
    return out


def data_warnings(spec: JobSpec, max_bytes: int = 256 << 20) -> list[str]:
    """Cheap checks of the spec against its data (a local JSONL file up to ``max_bytes``): warnings, not
    errors, because a small dataset still trains (its examples repeat)."""
    from pathlib import Path

    train = Path(spec.data.train)
    if "://" in spec.data.train or train.suffix != ".jsonl" or not train.is_file() or train.stat().st_size > max_bytes:
        return []
    with open(train, "rb") as f:
        n = sum(1 for line in f if line.strip())
    held_out = 0 if spec.data.eval is not None else int(n * spec.data.eval_fraction)
    per_step = spec.global_batch_size()
    if n - held_out < per_step:
        return [
            f"data.train has {n - held_out} training examples, fewer than one global batch "
            f"(train.micro_batch_size × grad accumulation × scaling.num_workers = {per_step}); examples repeat within a step"
        ]
    return []


def _plan_problems(spec: JobSpec, model) -> list[str]:
    import bitsandbytes as bnb
    import torch

    kind_bits = {bnb.nn.Linear4bit: 4, bnb.nn.Linear8bitLt: 8, torch.nn.Linear: 16}
    wrong = []
    for name, mod in model.named_modules():
        bits = kind_bits.get(type(mod))
        parts = name.split(".")
        if bits is None or parts[-1] == "lm_head" or any(p.startswith(("lora_", "modules_to_save")) for p in parts):
            continue
        name = name.removeprefix("base_model.model.").removesuffix(".base_layer")
        if bits != spec.module_bits(name):
            wrong.append(f"{name} is {bits}-bit")
    if wrong:
        return [f"model.quantization_plan: {len(wrong)} linear(s) are not at the planned bit-width, e.g. {wrong[0]}"]
    return []
