"""The tune section, the layerwise plan logic, the mixed 4/8/16-bit base and its memory model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.memory import Shape, layerwise_estimate, linear_bytes
from pipelines.spec import SpecError, pattern_bits
from pipelines.spec.tune import concurrency, trial_raw, validate
from tuning import layerwise as L

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _problems(raw) -> dict[str, str]:
    with pytest.raises(SpecError) as e:
        validate(raw)
    return dict(e.value.problems)


# --------------------------------------------------------------------------- the tune section


def test_a_bad_search_space_names_the_field_and_quotes_the_value():
    p = _problems(
        {
            "tune": {
                "space": {
                    "method.r": {"choice": [4, -2]},
                    "train.lrr": {"grid": [1]},
                    "train.lr": {"uniform": [1, 0.5]},
                }
            }
        }
    )
    assert "-2" in p["tune.space.method.r"] and "greater than 0" in p["tune.space.method.r"]
    assert "unknown field" in p["tune.space.train.lrr"]
    assert "[1, 0.5]" in p["tune.space.train.lr.uniform"]


def test_sweep_settings_that_cannot_work_are_refused():
    p = _problems({"train": {"eval_every": 0}, "tune": {"space": {"train.lr": {"grid": [1e-4]}}, "searcher": "optuna"}})
    assert "choice instead of grid" in p["tune.searcher"]
    assert "eval_every" in p["train.eval_every"] and "asha" in p["train.eval_every"]
    assert "60XB" in _problems({"tune": {"layerwise": {"budget": "60XB"}}})["tune.layerwise.budget"]
    assert _problems({"tune": {"space": {"method.r": {"randint": [1.5, 4]}}}})["tune.space.method.r.randint"]


def test_a_good_space_validates_and_each_trial_spec_is_the_job_with_its_values():
    spec = validate({"tune": {"space": {"train.lr": {"loguniform": [1e-5, 1e-2]}, "method.r": {"grid": [4, 8]}}}})
    raw = trial_raw(spec.model_dump(mode="json"), {"train.lr": 3e-4, "method.r": 8})
    assert "tune" not in raw
    trial = validate(raw)
    assert trial.train.lr == 3e-4 and trial.rank() == 8 and trial.train.max_steps == spec.train.max_steps


def test_search_space_becomes_tune_domains():
    from ray import tune

    from tuning.sweep import search_space

    s = search_space(
        {
            "a.b": {"loguniform": [1e-4, 1e-2]},
            "c.d": {"grid": [1, 2]},
            "e.f": {"choice": ["x", "y"]},
            "g.h": {"randint": [1, 5]},
        }
    )
    assert isinstance(s["a.b"], tune.search.sample.Float) and s["a.b"].lower == 1e-4
    assert s["c.d"] == {"grid_search": [1, 2]}
    assert s["e.f"].categories == ["x", "y"]
    assert (s["g.h"].lower, s["g.h"].upper) == (1, 5)


def test_concurrency_is_bounded_by_what_the_cluster_holds():
    assert concurrency({"CPU": 2}, {"CPU": 0.91, "GPU": 0}) == 2
    assert concurrency({"CPU": 2}, {"CPU": 1.01}) == 1
    assert concurrency({"CPU": 16, "GPU": 4}, {"CPU": 2.01, "GPU": 2}) == 2
    assert concurrency({"CPU": 64}, {"CPU": 1.01}, requested=3) == 3
    with pytest.raises(ValueError, match="needs"):
        concurrency({"CPU": 2}, {"CPU": 4.01})


def test_results_table_orders_best_first_and_marks_status():
    from tuning.sweep import results_table

    rows = [
        {"trial": "a", "lr": 0.1, "steps": 3, "eval_loss": 2.0, "error": False, "over_budget": False},
        {"trial": "b", "lr": 0.01, "steps": 12, "eval_loss": 1.0, "error": False, "over_budget": False},
    ]
    lines = results_table(rows, ["lr"], "eval_loss", 12).splitlines()
    assert lines[2].startswith("| b |") and lines[2].endswith("finished |")
    assert lines[3].endswith("stopped early |")


# --------------------------------------------------------------------------- layerwise plans (pure)


def test_plan_fields_follow_peft_pattern_rules():
    layers = [(4, 8), (8, 0), (16, 16)]
    f = L.plan_fields(layers, TARGETS)
    plan = f["model.quantization_plan"]
    assert pattern_bits(plan, 4, "model.layers.1.mlp.down_proj") == 8
    assert pattern_bits(plan, 4, "model.layers.2.self_attn.q_proj") == 16
    assert pattern_bits(plan, 8, "model.layers.12.self_attn.q_proj") == 8  # "layers.1" must not match layer 12
    import re

    assert re.fullmatch(f["method.target_modules"], "model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(f["method.target_modules"], "model.layers.1.self_attn.q_proj")  # rank 0: no adapter
    assert f["method.rank_pattern"] == {L.layer_key(0): 8, L.layer_key(2): 16}
    assert f["method.alpha_pattern"][L.layer_key(2)] == 32
    with pytest.raises(ValueError):
        L.plan_fields([(4, 0), (8, 0)], TARGETS)


def test_pareto_front():
    pts = [(1.0, 5.0), (2.0, 3.0), (1.5, 6.0), (3.0, 1.0), (2.5, 3.0)]
    assert L.pareto_front(pts) == [0, 1, 3]


def test_seed_plans_fit_the_budget_and_favour_sensitive_layers():
    shape = Shape(layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=100)
    budget = L.memory(shape, L.uniform(shape, 4, 8), TARGETS) * 1.25
    sens = {4: [0.9, 0.1, 0.1, 0.1], 8: [0.05, 0.01, 0.01, 0.01]}
    seeds = L.seed_plans(
        sens, [0.1, 0.2, 0.3, 0.4], [4, 8, 16], [0, 4, 8], lambda p: L.memory(shape, p, TARGETS) <= budget
    )
    assert seeds and all(L.memory(shape, s, TARGETS) <= budget for s in seeds)
    greedy = [s for s in seeds if len({b for b, _ in s}) > 1]
    assert greedy and all(s[0][0] >= max(b for b, _ in s[1:]) for s in greedy)  # layer 0 minds quantization most
    tiered = [s for s in seeds if len({r for _, r in s}) > 1]
    assert tiered and all(s[3][1] >= s[0][1] for s in tiered)  # layer 3 matters most for rank
    # the least important layer (0) gives up its adapter and the memory goes to rank elsewhere
    assert any(s[0][1] == 0 and max(r for _, r in s) == 8 and all(r for _, r in s[1:]) for s in seeds)


def test_repair_makes_over_budget_plans_fit_downgrading_bits_of_tolerant_layers_first():
    shape = Shape(layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=100)
    sens = {4: [0.9, 0.1, 0.2, 0.3], 8: [0.05, 0.01, 0.01, 0.01]}
    imp = [0.4, 0.3, 0.2, 0.1]

    def fits_under(budget):
        return lambda p: L.memory(shape, p, TARGETS) <= budget and any(r for _, r in p)

    greedy = [(16, 8)] * 4
    # room for three int8 layers: every layer steps 16 → 8 (the cheapest KL), then layer 1, which minds NF4
    # least, goes on to 4 bits; ranks untouched
    one = L.memory(shape, [(8, 8), (4, 8), (8, 8), (8, 8)], TARGETS)
    fixed = L.repair(greedy, sens, imp, [4, 8, 16], [0, 4, 8], fits_under(one))
    assert fixed == [(8, 8), (4, 8), (8, 8), (8, 8)]
    # below uniform NF4 rank 8: bits are all at 4, then rank goes from the least important layer (3) first
    tight = L.memory(shape, L.uniform(shape, 4, 8), TARGETS) - 1
    fixed = L.repair(greedy, sens, imp, [4, 8, 16], [0, 4, 8], fits_under(tight))
    assert fixed == [(4, 8), (4, 8), (4, 8), (4, 4)]
    assert L.repair([(4, 0)] * 4, sens, imp, [4, 8, 16], [0, 4, 8], fits_under(tight)) is None  # no adapter: unfixable
    assert L.repair(L.uniform(shape, 4, 8), sens, imp, [4, 8, 16], [0, 4, 8], fits_under(one)) == L.uniform(shape, 4, 8)


def test_under_a_peak_budget_repair_drops_the_adapter_that_frees_most_memory_per_importance():
    shape = Shape(layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=100)
    peak = L.Memory(shape, TARGETS, tokens=512)
    sens = {4: [0.1] * 4, 8: [0.01] * 4}
    imp = [0.2, 0.1, 0.4, 0.3]
    plan = [(4, 4), (4, 8), (4, 8), (4, 8)]
    budget = peak(plan) - 1

    def fits(p):
        return peak(p) <= budget and any(r for _, r in p)

    # by importance alone, layer 1 (the least important) loses rank; per byte freed, layer 0 loses its
    # adapter: below every other adapter, its activations are no longer kept at all
    assert L.repair(plan, sens, imp, [4, 8], [0, 4, 8], fits) == [(4, 4), (4, 4), (4, 8), (4, 8)]
    assert L.repair(plan, sens, imp, [4, 8], [0, 4, 8], fits, peak) == [(4, 0), (4, 8), (4, 8), (4, 8)]
    # the activations depend on where the adapters are, not only on how many there are
    assert peak([(4, 0), (4, 8), (4, 8), (4, 8)]) < peak([(4, 8), (4, 0), (4, 8), (4, 8)]) < peak([(4, 8)] * 4)
    assert L.Memory(shape, TARGETS)([(4, 0), (4, 8), (4, 8), (4, 8)]) == L.Memory(shape, TARGETS)(
        [(4, 8), (4, 0), (4, 8), (4, 8)]
    )


def test_memory_falls_with_bits_and_rises_with_rank():
    shape = Shape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=512)
    m = lambda b, r: L.memory(shape, L.uniform(shape, b, r), TARGETS)  # noqa: E731
    assert m(4, 8) < m(8, 8) < m(16, 8)
    assert m(4, 0) < m(4, 4) < m(4, 16)
    assert linear_bytes(64, 64, 8) == 64 * 64 + 4 * 64


# --------------------------------------------------------------------------- the mixed base (real bitsandbytes on CPU)


def _plan_spec(model_dir: Path, data: Path, layers):
    from tests.conftest import tiny_spec

    return tiny_spec(
        model_dir,
        data,
        method={
            "name": "lora",
            **{k.split(".")[1]: v for k, v in L.plan_fields(layers, TARGETS).items() if k.startswith("method.")},
        },
        model={"base": str(model_dir), "quantization_plan": L.plan_fields(layers, TARGETS)["model.quantization_plan"]},
    )


@pytest.mark.parametrize("layers", [[(4, 8), (8, 4)], [(16, 0), (4, 16)], [(8, 8), (8, 8)]])
def test_memory_model_matches_the_measured_bytes_of_the_quantized_model_and_adapter(tiny_model_dir, chat_data, layers):
    from pipelines.model import load_base, methods, model_bytes

    spec = _plan_spec(tiny_model_dir, chat_data, layers)
    base, _, _ = load_base(spec, log=lambda *_: None)
    weights = model_bytes(base)
    peft_model = methods.build(spec, base).model
    adapter = sum(p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad)
    shape = Shape.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    est = layerwise_estimate(shape, layers, TARGETS)
    assert abs(est.weights + est.adapter - (weights + adapter)) / (weights + adapter) < 0.05
    assert est.adapter == adapter


def test_mixed_4_8_16_bit_base_trains_on_cpu_and_survives_save_and_load(tiny_model_dir, chat_data, tmp_path):
    import bitsandbytes as bnb
    import torch
    from peft import PeftModel

    from pipelines import data as D
    from pipelines.lifecycle import load_base_as_trained
    from pipelines.model import load_base, methods
    from pipelines.train import preflight, save_adapter

    layers = [(4, 8), (8, 4)]
    spec = _plan_spec(tiny_model_dir, chat_data, layers)
    base, tok, _ = load_base(spec, log=lambda *_: None)
    assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert isinstance(base.model.layers[1].mlp.down_proj, bnb.nn.Linear8bitLt)
    names = preflight.module_names(base)
    prepared = methods.build(spec, base)
    assert not preflight.check(spec, prepared, names).problems
    model = prepared.model
    records, _ = D.train_eval_records(spec.data, 0)
    batch = D.collate(D.encode_all(records[:8], spec.data, tok), tok.pad_token_id)
    losses = []
    for _ in range(15):
        loss = model(**batch).loss
        loss.backward()
        prepared.optimizer.step()
        prepared.optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"][:2]).logits
    save_adapter(model, tmp_path / "adapter", spec)

    base2, _, q = load_base_as_trained(tmp_path / "adapter")
    assert q == "mixed"
    assert isinstance(base2.model.layers[1].mlp.down_proj, bnb.nn.Linear8bitLt)
    again = PeftModel.from_pretrained(base2, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        out = again(input_ids=batch["input_ids"][:2]).logits
        with again.disable_adapter():
            plain = again(input_ids=batch["input_ids"][:2]).logits
    # bnb's CPU kernels differ slightly between the training layout and a fresh load: compare with the adapter's effect
    effect = (ref - plain).abs().max()
    assert (out - ref).abs().max() < 0.05 * effect, ((out - ref).abs().max(), effect)


def test_a_base_that_does_not_follow_its_plan_fails_preflight(tiny_model_dir, chat_data):
    from pipelines.model import load_base, methods
    from pipelines.train import preflight

    spec = _plan_spec(tiny_model_dir, chat_data, [(4, 8), (8, 4)])
    other = _plan_spec(tiny_model_dir, chat_data, [(8, 8), (8, 4)])
    base, _, _ = load_base(other, log=lambda *_: None)
    names = preflight.module_names(base)
    with pytest.raises(preflight.PreflightError, match=r"model.quantization_plan: 7 linear\(s\).*layers\.0\."):
        preflight.check(spec, methods.build(spec, base), names)


def test_calibration_finds_nf4_noisier_than_int8(tiny_model_dir, chat_data):
    from tests.conftest import tiny_spec
    from tuning.calibrate import calibrate

    cal = calibrate(tiny_spec(tiny_model_dir, chat_data), [4, 8, 16], TARGETS, samples=8, log=lambda *_: None)
    assert set(cal["sensitivity"]) == {4, 8}
    assert all(a > b >= 0 for a, b in zip(cal["sensitivity"][4], cal["sensitivity"][8]))
    assert abs(sum(cal["importance"]) - 1) < 1e-6 and all(x > 0 for x in cal["importance"])


def test_is_uniform_and_the_point_round_trip():
    assert L.is_uniform([(4, 8)] * 3) and not L.is_uniform([(4, 8), (4, 8), (8, 8)])
    layers = [(4, 8), (8, 0), (16, 16)] * 4  # 12 layers: bits_10 must not be read as bits_1
    assert L.from_point({**L.to_point(layers), "memory_bytes": 1.0}) == layers


def test_layerwise_cli_refuses_a_budget_no_plan_fits_with_exit_2_before_ray_starts(
    tiny_model_dir, chat_data, tmp_path, capsys
):
    import ray
    import yaml

    from raypeft.cli import main

    spec = tmp_path / "lw.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "lw",
                "model": {"base": str(tiny_model_dir)},
                "method": {"name": "lora", "r": 4},
                "data": {"train": str(chat_data), "format": "chat", "max_length": 64},
            }
        )
    )
    assert main(["layerwise", str(spec), "--budget", "1MB"]) == 2
    err = capsys.readouterr().err
    assert "tune.layerwise.budget" in err and "smallest plan" in err and "peak memory" in err and "(got 1.0 MB)" in err
    # counted as weights + adapter only, the same budget asks less of the plan but is still far too small
    assert main(["layerwise", str(spec), "tune.layerwise.memory=weights", "--budget", "1kB"]) == 2
    assert "weights + adapter memory" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_raypeft_plan_on_a_written_layerwise_spec_counts_what_the_search_counted(
    tiny_model_dir, chat_data, tmp_path, capsys
):
    """`raypeft plan` on the spec the search writes reads the per-layer plan back and gives the search's own peak."""
    import yaml

    from pipelines.lifecycle import layers_of, shape_of
    from raypeft.cli import main
    from tests.conftest import tiny_spec
    from tuning.search import plan_memory

    spec = tiny_spec(tiny_model_dir, chat_data)
    shape = shape_of(spec)
    layers = [(4, 0), (8, 16)] if shape.layers == 2 else [(4, 0)] + [(8, 16)] * (shape.layers - 1)
    fields = L.plan_fields(layers, TARGETS)
    raw = spec.model_dump(mode="json", exclude={"tune"})
    raw["model"]["quantization_plan"] = fields["model.quantization_plan"]
    for k in ("r", "alpha", "rank_pattern", "alpha_pattern", "target_modules"):
        raw["method"][k] = fields[f"method.{k}"]
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(raw))
    written = validate(raw)
    assert layers_of(written, shape) == (layers, TARGETS)
    main(["plan", str(path), "--json"])
    out = capsys.readouterr().out
    assert "per-layer plan: 4b×r0 ×1" in out
    assert json.loads(out.strip().splitlines()[-1])["total"] == pytest.approx(plan_memory(written)(layers))
    assert layers_of(spec, shape) is None  # a plain spec keeps the uniform model


def test_layers_of_reads_targets_as_peft_does(tiny_model_dir, chat_data):
    from pipelines.lifecycle import layers_of, shape_of
    from tests.conftest import tiny_spec

    spec = tiny_spec(tiny_model_dir, chat_data)
    shape = shape_of(spec)
    plan = {L.layer_key(i): 8 for i in range(shape.layers)}
    every = validate(
        {
            **spec.model_dump(mode="json", exclude={"tune"}),
            "model": {"base": str(tiny_model_dir), "quantization_plan": plan},
        }
    )
    assert every.method.target_modules == "all-linear"
    assert layers_of(every, shape) == ([(8, 4)] * shape.layers, TARGETS)  # all-linear: every layer at method.r
    raw = every.model_dump(mode="json", exclude={"tune"})
    raw["method"]["target_modules"] = ["q_proj", "v_proj"]
    raw["method"]["rank_pattern"] = {L.layer_key(0): 16}
    assert layers_of(validate(raw), shape) == ([(8, 16)] + [(8, 4)] * (shape.layers - 1), ("q_proj", "v_proj"))


def test_ranks_without_an_adapter_are_refused():
    with pytest.raises(SpecError) as e:
        validate({"tune": {"layerwise": {"ranks": [0]}}})
    assert any(f == "tune.layerwise.ranks" and "rank > 0" in m for f, m in e.value.problems)


# --------------------------------------------------------------------------- the baseline the search must beat


def test_the_search_runs_under_its_baselines_checkpointing_with_its_rank_in_the_space(tiny_model_dir, chat_data):
    from pipelines.lifecycle import shape_of
    from tests.conftest import tiny_spec
    from tuning.search import under_baseline

    spec = tiny_spec(tiny_model_dir, chat_data, method={"name": "lora", "r": 6}, tune={"layerwise": {}})
    assert not spec.model.gradient_checkpointing and spec.tune.layerwise.baseline == "qlora_gc"  # the defaults
    searched, baseline = under_baseline(spec)
    n = shape_of(spec).layers
    assert baseline == [(4, 6)] * n
    assert searched.model.gradient_checkpointing and 6 in searched.tune.layerwise.ranks
    assert searched.tune.layerwise.ranks == sorted(searched.tune.layerwise.ranks)
    assert not spec.model.gradient_checkpointing  # the job's spec is not touched

    plain = validate({**spec.model_dump(mode="json"), "tune": {"layerwise": {"baseline": "qlora"}}})
    assert not under_baseline(plain)[0].model.gradient_checkpointing
    job = spec.model_dump(mode="json")
    job["model"]["gradient_checkpointing"] = True
    job["tune"] = {"layerwise": {"baseline": "none", "budget": "1GB"}}
    as_given, none = under_baseline(validate(job))
    assert none is None and as_given.model.gradient_checkpointing and 6 not in as_given.tune.layerwise.ranks


def test_the_budget_defaults_to_the_baselines_memory_and_may_be_a_share_of_it(tiny_model_dir, chat_data):
    from tests.conftest import tiny_spec
    from tuning.search import budget_of, plan_memory, under_baseline

    spec, baseline = under_baseline(tiny_spec(tiny_model_dir, chat_data, tune={"layerwise": {}}))
    own = plan_memory(spec)(baseline)
    assert budget_of(spec, baseline) >= own and budget_of(spec, baseline) - own < 1  # the baseline fits its own
    raw = spec.model_dump(mode="json")
    raw["tune"]["layerwise"]["budget"] = "110%"
    assert budget_of(validate(raw), baseline) == pytest.approx(1.1 * own, abs=1)
    raw["tune"]["layerwise"]["budget"] = "3MB"
    assert budget_of(validate(raw), baseline) == 3 * 2**20
    raw["tune"]["layerwise"].update({"budget": None, "baseline": "none"})
    with pytest.raises(SpecError) as e:
        budget_of(*under_baseline(validate(raw)))
    assert dict(e.value.problems)["tune.layerwise.budget"].startswith("required with baseline 'none'")


def test_a_baseline_the_space_cannot_hold_or_a_share_without_one_is_refused():
    p = _problems({"tune": {"layerwise": {"bits": [8, 16]}}})
    assert "uniform NF4: include 4" in p["tune.layerwise.bits"] and "[8, 16]" in p["tune.layerwise.bits"]
    assert "like 100% or 105%" in _problems({"tune": {"layerwise": {"budget": "x%"}}})["tune.layerwise.budget"]
    p = _problems({"tune": {"layerwise": {"budget": "105%", "baseline": "none"}}})
    assert "needs a baseline" in p["tune.layerwise.budget"]
    assert validate({"tune": {"layerwise": {"bits": [8, 16], "baseline": "none"}}}).tune.layerwise.bits == [8, 16]


def test_the_report_order_fix_applies_to_the_installed_ray():
    """``tuning.report_order`` patches a Ray-internal method; on a Ray whose internals differ it patches
    nothing, and then the sweep deadlock it fixes could come back unseen: this fails first."""
    from ray.train._internal.session import _TrainSession

    from tuning.report_order import deliver_train_reports_in_order

    assert deliver_train_reports_in_order() is True
    assert getattr(_TrainSession._get_result_from_queues, "_raypeft_reports_in_order", False)
    assert deliver_train_reports_in_order() is True  # once only
