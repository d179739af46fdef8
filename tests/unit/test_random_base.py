"""``benchmarks/random_base.py``: the random-init bases the GPU benchmarks run on where no model can be downloaded."""

from __future__ import annotations

import pytest

from benchmarks import random_base


@pytest.mark.parametrize(("shape", "millions"), [("smollm2-135m", 134.5), ("llama-1b", 1073.8), ("llama-8b", 8030.3)])
def test_each_shape_has_the_parameter_count_of_the_model_it_is_named_for(shape, millions):
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(random_base.config(shape))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)


def test_a_built_base_loads_tokenizes_the_chat_data_and_is_built_once(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("RAYPEFT_CACHE", str(tmp_path))
    monkeypatch.setitem(random_base.SHAPES, "tiny", (64, 128, 2, 4, 2, 9000, True))
    said = []
    path = random_base.build("tiny", log=said.append)
    assert len(said) == 1 and path == tmp_path / "models" / "random-tiny"

    model = AutoModelForCausalLM.from_pretrained(path)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (64, 2, 9000)
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) <= 9000 and tok.eos_token == "<|im_end|>" == tok.pad_token
    messages = [{"role": "user", "content": "Extract: Ana Silva, 41."}, {"role": "assistant", "content": '{"age": 41}'}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == '<|im_start|>user\nExtract: Ana Silva, 41.<|im_end|>\n<|im_start|>assistant\n{"age": 41}<|im_end|>\n'
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text) / 2  # merges learned from the shipped data

    assert random_base.build("tiny", log=said.append) == path and len(said) == 1  # the second call finds it


def test_an_unknown_shape_is_refused_naming_the_known_ones():
    with pytest.raises(SystemExit, match="unknown shape 'llama-70b'; one of smollm2-135m, llama-1b, llama-8b"):
        random_base.build("llama-70b")
