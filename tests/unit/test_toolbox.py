"""Adapter toolbox: parameter budgets vs formulas, merge/export (dequantization-aware), combination arithmetic.

No Ray. Registration uses a real SQLite MLflow backend in a temp RAYPEFT_HOME.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines import data as D
from pipelines.lifecycle import AdapterError, combine, compatibility_problems, export, load_base_as_trained
from pipelines.model import load_base, methods
from pipelines.model.methods.compare import compare
from pipelines.train import save_adapter
from tests.conftest import tiny_spec

# --------------------------------------------------------------------------- budgets vs formulas


def _dims(cfg) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear in one decoder layer, from the config alone."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads)
    return {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def _expected(cfg, r: int) -> dict[str, int]:
    d, layers = _dims(cfg), cfg.num_hidden_layers
    lora = layers * sum(r * (a + b) for a, b in d.values())
    return {
        "lora": lora,
        "dora": lora + layers * sum(b for _, b in d.values()),  # + one magnitude per output feature
        # IA3: a vector on k/v outputs and on down_proj's input (a feed-forward module)
        "ia3": layers * (d["k_proj"][1] + d["v_proj"][1] + d["down_proj"][0]),
    }


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_compare_counts_match_formulas(which, tiny_model_dir):
    from transformers import AutoConfig

    from pipelines.model import resolve_base
    from pipelines.spec import validate

    base = str(tiny_model_dir) if which == "tiny" else "smollm2-135m"
    cfg = AutoConfig.from_pretrained(resolve_base(validate({"model": {"base": base}}).model))
    r = 8
    rows = {row.method: row for row in compare(base, ["lora", "dora"], "all-linear", r=r, log=lambda *_: None)}
    ia3 = compare(
        base,
        ["ia3"],
        ["k_proj", "v_proj", "down_proj"],
        r=r,
        args={"ia3": {"feedforward_modules": ["down_proj"]}},
        log=lambda *_: None,
    )[0]
    want = _expected(cfg, r)
    assert rows["lora"].trainable == want["lora"]
    assert rows["dora"].trainable == want["dora"]
    assert ia3.trainable == want["ia3"], ia3
    total_base = rows["lora"].total - rows["lora"].trainable
    assert rows["dora"].total - rows["dora"].trainable == total_base  # the base is the same model
    assert 0 < rows["lora"].percent < 100


def test_compare_reports_a_failing_method_as_a_row(tiny_model_dir):
    rows = compare(str(tiny_model_dir), ["lora", "nosuchmethod"], log=lambda *_: None)
    assert rows[0].error is None and rows[1].error and "unknown method" in rows[1].error


def test_compare_cli_writes_table_csv_and_png(tiny_model_dir, tmp_path, capsys):
    from raypeft.cli import main

    assert (
        main(
            [
                "methods",
                "compare",
                "--model",
                str(tiny_model_dir),
                "--methods",
                "lora,dora,loha",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| lora |" in out and "| dora |" in out
    assert (tmp_path / "methods.csv").read_text().count("\n") == 4
    assert (tmp_path / "methods.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- training helpers


def _trained_adapter(tiny_model_dir, chat_data, out: Path, steps: int = 8, **method) -> Path:
    spec = tiny_spec(tiny_model_dir, chat_data, method={"name": "lora", "r": 4, "dropout": 0.0, **method})
    torch.manual_seed(0)
    base, tok, _ = load_base(spec)
    prepared = methods.build(spec, base)
    ex = D.encode_all(D.load_records(str(chat_data)), spec.data, tok)
    batch = D.collate(ex[:8], tok.pad_token_id)
    for g in prepared.optimizer.param_groups:
        g["lr"] = 0.05
    for _ in range(steps):
        prepared.model(**batch).loss.backward()
        prepared.optimizer.step()
        prepared.optimizer.zero_grad()
    save_adapter(prepared.model, out, spec)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# --------------------------------------------------------------------------- export


def test_merged_export_equals_the_adapter_model(tiny_model_dir, chat_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = _trained_adapter(tiny_model_dir, chat_data, tmp_path / "a")
    report = export(str(adapter), tmp_path / "merged", merge=True, log=lambda *_: None)
    assert report["quantization"] == "none" and report["max_abs_logit_diff"] < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()
    ids = torch.randint(0, 300, (2, 24))
    torch.testing.assert_close(_logits(merged, ids), _logits(ref, ids), atol=1e-5, rtol=1e-5)
    with ref.disable_adapter():
        base_logits = _logits(ref, ids)
    assert (_logits(ref, ids) - base_logits).abs().max() > 1e-3, "the adapter is a no-op: the test proves nothing"


def test_export_without_merge_copies_the_adapter(tiny_model_dir, chat_data, tmp_path):
    adapter = _trained_adapter(tiny_model_dir, chat_data, tmp_path / "a", steps=1)
    report = export(str(adapter), tmp_path / "plain", merge=False)
    assert {"adapter_model.safetensors", "adapter_config.json", "raypeft.json"} <= set(report["files"])


def test_4bit_adapter_merges_into_dequantized_weights(tiny_model_dir, chat_data, tmp_path):
    """Merging a QLoRA adapter into dequant(W4) reproduces the 4-bit model far better than merging into W."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = _trained_adapter(tiny_model_dir, chat_data, tmp_path / "q", name="qlora")
    assert json.loads((adapter / "raypeft.json").read_text())["quantization"] == "nf4"
    report = export(str(adapter), tmp_path / "merged", merge=True, log=lambda *_: None)
    assert report["quantization"] == "nf4" and report["dequantized_layers"] >= 14

    ids = torch.randint(0, 300, (2, 24))
    base4, _, _ = load_base_as_trained(adapter)
    reference = _logits(PeftModel.from_pretrained(base4, adapter).eval(), ids)  # what training saw
    ours = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids)
    naive = _logits(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).merge_and_unload(), ids
    )
    d_ours, d_naive = (ours - reference).abs().max().item(), (naive - reference).abs().max().item()
    assert d_ours < 1e-3 and d_ours < d_naive / 10, (d_ours, d_naive)


def test_export_from_a_registered_version(tiny_model_dir, chat_data, tmp_path, raypeft_home, monkeypatch):
    """…and the registry's copy of the adapter, downloaded for it, is removed afterwards."""
    import tempfile

    from pipelines.lifecycle import resolve
    from raypeft.cli import main

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where the download goes, this test's own

    adapter = _trained_adapter(tiny_model_dir, chat_data, tmp_path / "a", steps=2)
    from pipelines import tracking

    reg = tracking.register_directory(tracking.tracking_uri(), str(adapter), "tiny-export", "seed", {"k": "v"})
    assert reg["version"] == 1
    out = tmp_path / "from-registry"
    assert main(["export", "models:/tiny-export/1", str(out), "--merge", "--register", "tiny-merged"]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    from mlflow import MlflowClient

    c = MlflowClient(tracking.tracking_uri(), registry_uri=tracking.tracking_uri())
    v = c.get_model_version("tiny-merged", "1")
    assert v.tags["raypeft.source"] == "models:/tiny-export/1" and v.tags["raypeft.merged"] == "True"
    assert not list(temp.iterdir())  # nothing of the download left behind
    with pytest.raises(ValueError, match="pass dst"):
        resolve("models:/tiny-export/1")  # a download needs a place its caller owns


def test_export_of_a_missing_reference_exits_2(tmp_path, raypeft_home, capsys):
    from raypeft.cli import main

    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "adapter directory not found" in capsys.readouterr().err
    assert main(["export", "models:/never-registered/3", str(tmp_path / "out2")]) == 2
    assert "cannot resolve 'models:/never-registered/3'" in capsys.readouterr().err


# --------------------------------------------------------------------------- combine


def _deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """ΔW = scaling · B · A per module, computed from the saved tensors and config."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    t = load_file(adapter_dir / "adapter_model.safetensors")
    scale = cfg["lora_alpha"] / cfg["r"]
    return {
        k.replace(".lora_A.weight", ""): scale * t[k.replace("lora_A", "lora_B")] @ t[k] for k in t if "lora_A" in k
    }


def _factors(adapter_dir: Path):
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    t = load_file(adapter_dir / "adapter_model.safetensors")
    return cfg["lora_alpha"] / cfg["r"], t


def test_cat_combination_is_the_weighted_sum_of_deltas(tiny_model_dir, chat_data, tmp_path):
    a = _trained_adapter(tiny_model_dir, chat_data, tmp_path / "a", args={"init_lora_weights": False})
    b = _trained_adapter(tiny_model_dir, chat_data, tmp_path / "b", steps=3, r=2, args={"init_lora_weights": False})
    report = combine([str(a), str(b)], [0.7, 0.3], "cat", tmp_path / "c", log=lambda *_: None)
    assert report["r"] == 6
    da, db, dc = _deltas(a), _deltas(b), _deltas(tmp_path / "c")
    assert da.keys() == dc.keys()
    for k in dc:
        torch.testing.assert_close(dc[k], 0.7 * da[k] + 0.3 * db[k], atol=1e-6, rtol=1e-5)
    meta = json.loads((tmp_path / "c" / "raypeft.json").read_text())
    assert meta["parents"] == [str(a), str(b)] and meta["weights"] == [0.7, 0.3]


def test_linear_combination_gives_the_expected_delta(tiny_model_dir, chat_data, tmp_path):
    a = _trained_adapter(tiny_model_dir, chat_data, tmp_path / "a", args={"init_lora_weights": False})
    b = _trained_adapter(tiny_model_dir, chat_data, tmp_path / "b", steps=3, args={"init_lora_weights": False})
    combine([str(a), str(b)], [0.7, 0.3], "linear", tmp_path / "c", log=lambda *_: None)
    (sa, ta), (sb, tb) = _factors(a), _factors(b)
    dc = _deltas(tmp_path / "c")
    wa, wb = (0.7 * sa) ** 0.5, (0.3 * sb) ** 0.5
    for k in dc:
        A = wa * ta[k + ".lora_A.weight"] + wb * tb[k + ".lora_A.weight"]
        B = wa * ta[k + ".lora_B.weight"] + wb * tb[k + ".lora_B.weight"]
        torch.testing.assert_close(dc[k], B @ A, atol=1e-6, rtol=1e-5)  # PEFT's linear: combine A and B, scale 1


def test_incompatible_adapters_are_refused(tiny_model_dir, chat_data, tmp_path):
    a = _trained_adapter(tiny_model_dir, chat_data, tmp_path / "a", steps=1)
    b = _trained_adapter(tiny_model_dir, chat_data, tmp_path / "b", steps=1, r=2)
    with pytest.raises(AdapterError, match="linear needs equal ranks"):
        combine([str(a), str(b)], [0.5, 0.5], "linear", tmp_path / "c")
    with pytest.raises(AdapterError, match="one weight per adapter"):
        combine([str(a), str(b)], [1.0], "cat", tmp_path / "c")
    cfgs = [
        {"peft_type": "LORA", "base_model_name_or_path": "x", "r": 4, "target_modules": ["q_proj"]},
        {"peft_type": "LORA", "base_model_name_or_path": "y", "r": 4, "target_modules": ["v_proj"]},
    ]
    problems = compatibility_problems(cfgs, [{}, {"quantization": "nf4"}], "ties")
    assert any("different bases" in p for p in problems) and any("differently quantized" in p for p in problems)
    assert any("same target modules" in p for p in problems)


def test_combine_cli_registers_with_lineage(tiny_model_dir, chat_data, tmp_path, raypeft_home, capsys):
    from mlflow import MlflowClient

    from pipelines import tracking
    from raypeft.cli import main

    a = _trained_adapter(tiny_model_dir, chat_data, tmp_path / "a", steps=1)
    b = _trained_adapter(tiny_model_dir, chat_data, tmp_path / "b", steps=2)
    assert (
        main(
            [
                "combine",
                str(a),
                str(b),
                "--weights",
                "0.7,0.3",
                "--method",
                "linear",
                "--name",
                "mix",
                "--out",
                str(tmp_path / "mix"),
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["registry"]["version"] == 1
    c = MlflowClient(tracking.tracking_uri(), registry_uri=tracking.tracking_uri())
    tags = c.get_model_version("mix", "1").tags
    assert tags["raypeft.parents"] == f"{a},{b}" and tags["raypeft.combination"] == "linear"
    assert main(["combine", str(a), str(b), "--weights", "x", "--name", "bad"]) == 2
