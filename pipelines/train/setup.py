"""The worker's model phase: the base (partitioned as it loads under ZeRO-3), the method on it, how its
micro-batches are laid out, its pre-flight, and the engine that steps it."""

from __future__ import annotations

import time

from pipelines.train.state import ModelSetup, Worker


def setup_model(w: Worker) -> ModelSetup:
    """The base, the method, the micro-batch layout, the pre-flight and the engine, in that order."""
    from pipelines.model import load_base, methods, module_names, one_4bit_layout
    from pipelines.train import preflight
    from pipelines.train.attention import batch_layout
    from pipelines.train.engines import build_engine, deepspeed_setup

    spec, device = w.spec, w.device
    ds_config = spec.deepspeed_config()
    hf_ds = deepspeed_setup(
        ds_config, device, quantized=spec.quantization() != "none"
    )  # keep alive: ZeRO-3 partitions weights while they load
    t_load = time.perf_counter()
    base, tok, _ = load_base(spec, device=device, log=w.log)
    # evals and checkpoint probes must not switch the 4-bit kernel mid-run
    if one_4bit_layout(base) and device.type == "cpu":
        w.log(
            "quantized base on CPU: bitsandbytes' own kernels (NF4 dequantized per matmul); its AVX512-BF16 "
            "inference kernel and the optional `kernels` hub package are not used in training"
        )
    model_load_s = time.perf_counter() - t_load
    base_modules = module_names(base)
    prepared = methods.build(spec, base)
    if spec.quantization() == "none" and hf_ds is None:
        prepared.model.to(device)
    prepared.model.train()
    layout = batch_layout(spec, prepared.model, device)
    # before step 0: base frozen, optimizer = trainables, targets matched, B = 0, dtype/quantization
    report = preflight.check(spec, prepared, base_modules)
    w.log(f"method {spec.method.name}: pre-flight ok, " + report.summary().replace("\n", "; "))
    engine = build_engine(spec, prepared, w.rank, w.world, device, ds_config)
    w.log(
        f"strategy {spec.scaling.strategy}: {w.world} worker(s), global batch {spec.global_batch_size()} "
        f"= {spec.train.micro_batch_size} × {spec.grad_accum()} accumulation × {w.world}"
    )
    lockstep = ds_config is not None and ds_config["zero_optimization"]["stage"] == 3
    return ModelSetup(prepared, tok, layout, engine, lockstep, model_load_s, [g["lr"] for g in engine.param_groups])
