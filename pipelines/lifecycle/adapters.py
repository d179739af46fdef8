"""Adapter toolbox: resolve an adapter reference, export (optionally merged), combine adapters.

* ``local_adapter(ref)``: a local adapter directory for a ``with`` block: the directory
  itself, or an MLflow model URI (``models:/name@alias``, ``models:/name/version``,
  ``models:/<model_id>``) downloaded to a temporary directory removed afterwards
  (``resolve(ref, dst=...)`` downloads to a directory of the caller's).
* ``export(ref, out, merge=True)``: merge the adapter into its base and write a plain
  HF model directory. For adapters trained on a 4-bit or 8-bit base, the delta is added
  to the *dequantized* weights the adapter was trained against (not to the original
  fp weights, which differ from what training saw), and the logits difference between
  the merged model and the unmerged adapter model is reported.
* ``combine(refs, weights, method, out)``: a weighted combination through PEFT's
  ``add_weighted_adapter`` (linear, cat, ties, dare_linear, dare_ties, svd), after
  checking that the adapters share a base and have compatible ranks and targets.

Every adapter directory raypeft writes carries ``raypeft.json`` beside the standard
PEFT files: how its base was loaded (id, quantization, dtypes) and its lineage.
PEFT, vLLM and LoRAX ignore the extra file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from pipelines.spec import META_FILE, UserError, adapter_meta, read_meta  # noqa: F401 - the toolbox reads and writes them

PROBE_TEXT = "Extract the person as JSON: Maria Lopez, 34, is a nurse in Porto."
COMBINATIONS = ("linear", "cat", "ties", "dare_linear", "dare_ties", "svd")


class AdapterError(UserError, ValueError):
    """A bad adapter reference or an incompatible combination (exit code 2 in the CLI)."""


# --------------------------------------------------------------------------- metadata


def read_config(adapter_dir: Path) -> dict[str, Any]:
    f = Path(adapter_dir) / "adapter_config.json"
    if not f.is_file():
        raise AdapterError(f"not a PEFT adapter directory (no adapter_config.json): {str(adapter_dir)!r}")
    return json.loads(f.read_text())


# --------------------------------------------------------------------------- references


def is_registry_ref(ref: str) -> bool:
    return ref.startswith(("models:/", "runs:/"))


def resolve(ref: str, tracking_uri: str | None = None, dst: str | None = None) -> Path:
    """A local adapter directory for ``ref``: a path, or an MLflow ``models:/`` / ``runs:/`` URI downloaded into
    ``dst`` (required for those: the caller owns the copy; ``local_adapter`` removes it afterwards)."""
    if is_registry_ref(ref):
        import mlflow

        from pipelines.tracking import _global_uri
        from pipelines.tracking import tracking_uri as default_uri

        if dst is None:
            raise ValueError(f"resolve({ref!r}) downloads: pass dst, or use local_adapter()")
        uri = tracking_uri or default_uri()
        try:
            with _global_uri(uri):
                local = mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=dst)
        except Exception as e:  # noqa: BLE001 - MLflow raises several types for a missing model/alias
            raise AdapterError(f"cannot resolve {ref!r} in {uri}: {e}") from None
        path = Path(local)
        if not (path / "adapter_config.json").is_file():
            found = list(path.rglob("adapter_config.json"))
            if not found:
                raise AdapterError(f"{ref!r} holds no PEFT adapter (no adapter_config.json)")
            path = found[0].parent
        return path
    path = Path(os.path.expanduser(ref))
    if not path.is_dir():
        raise AdapterError(f"adapter directory not found (got {ref!r})")
    read_config(path)
    return path


@contextmanager
def local_adapter(ref: str, tracking_uri: str | None = None) -> Iterator[Path]:
    """``resolve(ref)`` for the span of a ``with`` block: a registry adapter is downloaded into a temporary
    directory that is removed when the block ends (nothing of it is left in the temp dir); a local
    directory is used in place."""
    if not is_registry_ref(ref):
        yield resolve(ref, tracking_uri)
        return
    with tempfile.TemporaryDirectory(prefix="raypeft-adapter-") as dst:
        yield resolve(ref, tracking_uri, dst=dst)


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_base_as_trained(adapter_dir: Path):
    """The base exactly as the adapter's training loaded it (``trained_base_spec``), its tokenizer, and its
    quantization (``nf4``, ``int8``, ``none`` or ``mixed`` for a per-layer plan)."""
    from pipelines.model import load_base, one_4bit_layout, trained_base_spec

    spec = trained_base_spec(adapter_dir)
    model, tok, _ = load_base(spec, log=lambda *_: None)
    one_4bit_layout(model)  # keep dequantization exact and comparable
    return model, tok, "mixed" if spec.model.quantization_plan else spec.quantization()


# --------------------------------------------------------------------------- export


def dequantized_state_dict(model) -> tuple[dict[str, Any], int]:
    """The model's weights with every bitsandbytes linear dequantized to fp32: the weights the
    adapter was actually trained against. Returns (state dict, number of dequantized layers)."""
    import bitsandbytes as bnb
    import torch
    from peft.utils.integrations import dequantize_module_weight

    state: dict[str, Any] = {}
    quantized = {
        name: mod for name, mod in model.named_modules() if isinstance(mod, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    }
    for name, mod in quantized.items():
        state[f"{name}.weight"] = dequantize_module_weight(mod).detach().to(torch.float32).cpu().clone()
        if mod.bias is not None:
            state[f"{name}.bias"] = mod.bias.detach().float().cpu().clone()
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if owner not in quantized:
            state[name] = p.detach().float().cpu().clone()
    return state, len(quantized)


def _prompt_logits(model, tokenizer):
    """Logits on ``PROBE_TEXT`` (export's merged-vs-unmerged check)."""
    import torch

    ids = tokenizer(PROBE_TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def export(
    ref: str, out: str | Path, merge: bool = True, dtype: str = "fp32", tracking_uri: str | None = None, log=print
) -> dict[str, Any]:
    """Write the adapter alone, or merged into its base as a plain HF model directory.

    Returns a report: out, merged, quantization, dequantized layers and ``max_abs_logit_diff``
    (merged vs unmerged, on a probe prompt).
    """
    with local_adapter(ref, tracking_uri) as src:
        return _export(src, ref, Path(out), merge, dtype, log)


def _export(src: Path, ref: str, out: Path, merge: bool, dtype: str, log) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipelines.model import LOADS, resolve_base, trained_base_spec

    if out.exists() and any(out.iterdir()):
        raise AdapterError(f"output directory is not empty: {str(out)!r}")
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"source": ref, "out": str(out), "merged": merge}
    if not merge:
        for f in src.iterdir():
            if f.is_file() and (f.suffix in (".json", ".safetensors") or f.name == "README.md"):
                shutil.copy2(f, out / f.name)
        report["files"] = sorted(p.name for p in out.iterdir())
        return report

    base, tok, q = load_base_as_trained(src)
    log(f"[raypeft] merging {ref} into its {'dequantized ' + q if q != 'none' else q} base")
    state, report["dequantized_layers"] = dequantized_state_dict(base)  # before the adapter wraps the layers
    reference = _prompt_logits(PeftModel.from_pretrained(base, str(src)).eval(), tok)  # the adapter model as trained
    report["quantization"] = q
    # a clean, unquantized model of the same architecture, holding dequant(W), takes the merge
    cfg = AutoConfig.from_pretrained(resolve_base(trained_base_spec(src).model, log=lambda *_: None))
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    with LOADS:
        clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(
            f"base weights do not fit the architecture: missing={missing[:3]} unexpected={unexpected[:3]}"
        )
    clean.tie_weights()
    del base, state
    clean = PeftModel.from_pretrained(clean, str(src)).merge_and_unload().eval()
    report["max_abs_logit_diff"] = float((_prompt_logits(clean, tok) - reference).abs().max())
    clean.to(_dtype(dtype)).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / META_FILE).write_text(
        json.dumps({**read_meta(src), "merged_from": ref, "quantization": "none", "dtype": dtype}, indent=2)
    )
    report["dtype"] = dtype
    return report


# --------------------------------------------------------------------------- combine


def compatibility_problems(configs: list[dict], metas: list[dict], method: str) -> list[str]:
    """Why these adapters cannot be combined with ``method`` (empty: they can). Pure."""
    out = []
    types = {c.get("peft_type") for c in configs}
    if types != {"LORA"}:
        out.append(f"only LoRA-family adapters combine (got peft types {sorted(map(str, types))})")
    if any(c.get("use_dora") for c in configs):
        out.append("DoRA adapters cannot be combined (their magnitude vectors do not add up)")
    bases = {c.get("base_model_name_or_path") for c in configs}
    if len(bases) > 1:
        out.append(f"adapters were trained on different bases: {sorted(map(str, bases))}")
    quants = {m.get("quantization", "none") for m in metas}
    if len(quants) > 1:
        out.append(f"adapters were trained on differently quantized bases: {sorted(quants)}")
    targets = {
        json.dumps(
            sorted(c["target_modules"]) if isinstance(c.get("target_modules"), list) else c.get("target_modules")
        )
        for c in configs
    }
    if len(targets) > 1 and method not in ("cat", "svd"):
        out.append(
            f"{method} needs the same target modules in every adapter (got {sorted(targets)}); cat and svd accept different ones"
        )
    ranks = {c.get("r") for c in configs}
    if len(ranks) > 1 and method in ("linear", "ties", "dare_linear", "dare_ties"):
        out.append(f"{method} needs equal ranks (got {sorted(ranks)}); use cat or svd")
    return out


def combine(
    refs: list[str],
    weights: list[float],
    method: str,
    out: str | Path,
    density: float = 0.5,
    tracking_uri: str | None = None,
    log=print,
) -> dict[str, Any]:
    """Write the weighted combination of ``refs`` as a new standard PEFT adapter in ``out``."""
    if method not in COMBINATIONS:
        raise AdapterError(f"--method must be one of {', '.join(COMBINATIONS)} (got {method!r})")
    if len(refs) < 2:
        raise AdapterError(f"combine needs at least two adapters (got {len(refs)})")
    if len(weights) != len(refs):
        raise AdapterError(
            f"--weights needs one weight per adapter: {len(refs)} adapters, {len(weights)} weights (got {weights})"
        )
    with ExitStack() as stack:
        dirs = [stack.enter_context(local_adapter(r, tracking_uri)) for r in refs]
        return _combine(refs, dirs, weights, method, Path(out), density, log)


def _combine(refs, dirs: list[Path], weights, method: str, out: Path, density: float, log) -> dict[str, Any]:
    from peft import PeftModel

    from pipelines.model import load_base, trained_base_spec

    configs, metas = [read_config(d) for d in dirs], [read_meta(d) for d in dirs]
    problems = compatibility_problems(configs, metas, method)
    if problems:
        raise AdapterError("incompatible adapters:\n" + "\n".join(f"  - {p}" for p in problems))
    if out.exists() and any(out.iterdir()):
        raise AdapterError(f"output directory is not empty: {str(out)!r}")

    # adapter arithmetic touches only the LoRA tensors: an fp32 base of the right shape is enough
    base, _, _ = load_base(trained_base_spec(dirs[0], quantized=False), log=lambda *_: None)
    names = [f"parent{i}" for i in range(len(dirs))]
    model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=names[0])
    for name, d in zip(names[1:], dirs[1:]):
        model.load_adapter(str(d), adapter_name=name)
    kwargs: dict[str, Any] = {"density": density} if method in ("ties", "dare_linear", "dare_ties") else {}
    model.add_weighted_adapter(names, list(weights), adapter_name="combined", combination_type=method, **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, selected_adapters=["combined"], safe_serialization=True)
        shutil.copytree(Path(tmp) / "combined", out, dirs_exist_ok=True)
    meta = {**metas[0], "method": f"combine:{method}", "parents": refs, "weights": list(weights), "combination": method}
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    log(f"[raypeft] combined {len(refs)} adapters ({method}, weights {weights}) into {out}")
    return {
        "out": str(out),
        "parents": refs,
        "weights": list(weights),
        "method": method,
        "r": read_config(out).get("r"),
    }
