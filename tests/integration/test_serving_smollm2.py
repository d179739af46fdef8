"""The real base through Ray Serve: SmolLM2 with its own tokenizer and chat template, an adapter on it,
the unmodified openai client; the answer equals PEFT's greedy generation on the same rendered prompt."""

from __future__ import annotations

import pytest
import torch

from cluster.connect import init_ray
from tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2_adapter(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipelines.model import resolve_base
    from pipelines.spec import validate

    base_path = resolve_base(validate({"model": {"base": "smollm2-135m"}}).model, log=lambda *_: None)
    torch.manual_seed(5)
    cfg = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path), cfg)
    with torch.no_grad():  # a visible but gentle change of behaviour
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("smollm2-adapter") / "adapter"
    model.save_pretrained(out)
    return base_path, out


def _peft_answer(base_path, adapter, messages, n):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter).eval()
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_smollm2_chat_through_serve_equals_peft(smollm2_adapter):
    import ray
    import requests
    from openai import OpenAI
    from ray import serve

    from serving.app import build_app
    from serving.spec import validate

    base_path, adapter = smollm2_adapter
    port = free_port()
    ray.shutdown()
    init_ray(num_cpus=2, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        spec = validate(
            {
                "name": "smollm2-serve",
                "model": {"base": "smollm2-135m"},
                "adapters": {"gentle": str(adapter)},
                "cache": {"active_slots": 2, "max_rank": 8, "prefetch": ["gentle"]},
                "limits": {"max_new_tokens": 16, "max_prompt_tokens": 256},
            }
        )
        serve.run(build_app(spec), name="smollm2-serve", route_prefix="/")
        requests.get(f"http://127.0.0.1:{port}/health", timeout=60).raise_for_status()
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        messages = [
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "What is the capital of France?"},
        ]
        got = client.chat.completions.create(model="smollm2-135m:gentle", messages=messages, max_tokens=12)
        assert got.choices[0].message.content == _peft_answer(base_path, adapter, messages, 12)
        assert got.usage.prompt_tokens > 20  # the chat template's own tokens were rendered and counted
        streamed = client.chat.completions.create(
            model="smollm2-135m:gentle", messages=messages, max_tokens=12, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == got.choices[0].message.content
        lp = {  # the adapter answered: its distribution differs from the base's, even where the words agree
            model: client.chat.completions.create(model=model, messages=messages, max_tokens=4, logprobs=True)
            .choices[0]
            .logprobs.content[0]
            .logprob
            for model in ("smollm2-135m", "smollm2-135m:gentle")
        }
        assert abs(lp["smollm2-135m"] - lp["smollm2-135m:gentle"]) > 1e-4, lp
    finally:
        serve.shutdown()
        ray.shutdown()
