#!/usr/bin/env bash
# The GPU check, prepared as one command for a lent machine that has CUDA PyTorch, transformers and pytest but
# no package index, no Ray, MLflow or DeepSpeed, and no SmolLM2 (issues 33 and 35). All of it takes about 20
# minutes of one H100/H200, more than one session's device time: run the steps that matter most first, a call
# of at most 600 s each (the argument below), in this order:
#   1. 'gpu_tests|train_1b$|flex'   correctness on CUDA, the default step and FlexAttention (issue 33)
#   2. 'serve|lora|full_logits'     the decode step and the multi-LoRA product (35), the chunked loss (33)
#   3. 'dora|qlora|galore|135m|attention'
# Every step has its own time limit, so one that hangs costs only its share.
#
#   ../shared/offline-cuda/pack.sh                    # here, once: the wheels it lacks into .whl/ (~46 MiB)
#   bash benchmarks/gpu_check.sh                      # there (device tool: carry [".whl"]); logs under $OUT
#   bash benchmarks/gpu_check.sh 'gpu_tests|flex'     # only the steps whose names match (e.g. to fit 600 s a call)
#   bash benchmarks/gpu_check.sh                      # here, without CUDA: the same steps, short (no 1B), a dry run
#
# What it runs, each benchmark in fresh processes, sides alternating, each ending in one JSON line
# (gathered into summary.jsonl):
#   gpu_tests          the `gpu` tests (the engine's bf16 adapters on the device)
#   train_135m         benchmarks.train_throughput on a random-init SmolLM2-135M shape: raypeft's step vs a bare
#                      PEFT loop, the device's defaults (on a GPU: padded rows, chunked loss)
#   train_135m_padding_free  the same with data.padding_free=true (per-example SDPA, the shared prefix)
#   train_1b           the same defaults on a Llama-1B shape
#   train_*_flex       both shapes with train.attention=flex (one compiled FlexAttention call per layer; GPU only)
#   train_1b_{dora,qlora,galore}  those methods on the 1B shape, each against its own bare loop (--method)
#   train_1b_full_logits  the 1B shape with train.loss_chunk_tokens=0: the chunked loss against the full logits
#   attention          benchmarks.attention on both shapes: per-example SDPA vs one FlexAttention call vs padded SDPA
#   lora_product       benchmarks.lora_product on the 1B shape: the multi-LoRA product in place vs gathered (bmm)
#                      vs grouped by adapter, 8 rows over 8 adapters and 32 over 8
#   serve_compile_decode  benchmarks.compile_decode on the 1B shape: the engine's decode step eager vs torch.compile
#   serve_1b_compiled  benchmarks.serving --compile-decode on the 1B shape: the issue's goal keys
#                      (mixed_over_hf_base, mixed_over_engine_base, decode_step_p50_ms) with the compiled step
#   serve_135m         benchmarks.serving: the engine's mixed-adapter decode vs its base-only rows vs HF generate
set -uo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
PY=${PY:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  gpu=(--gpu); train=(--steps 20 --warmup 3); serve=(--tokens 64 --repeats 2); attn=(--repeats 2); limit=240
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.txt" 2>&1
else
  gpu=(); train=(--steps 2 --warmup 1); serve=(--tokens 4 --repeats 1); attn=(--repeats 1 --iters 1 --warmup 1); limit=300
  echo "no CUDA: a dry run of the same steps on the CPU" | tee "$out/device.txt"
fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> "$out/device.txt"

only=${1:-.}  # a regular expression: the steps whose names match it run (all of them by default)
step() {  # name, then the python arguments; the log keeps everything, the console the lines that matter
  local name=$1; shift
  [[ $name =~ $only ]] || return 0
  echo "== $name: $PY $*  ($(date -u +%H:%M:%S))"
  timeout "$limit" "$PY" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  grep -v "Loading weights\|Writing model shards\|^\s*$" "$out/$name.log" | tail -12
  echo "== $name: exit $rc"
}

step gpu_tests -m pytest -q -p no:cacheprovider -o addopts= tests/unit/test_engine_cuda.py tests/unit/test_flex_cuda.py tests/unit/test_engine_compile.py -m gpu
step train_135m -m benchmarks.train_throughput "${gpu[@]}" --random-base smollm2-135m "${train[@]}" --repeats 3
step train_135m_padding_free -m benchmarks.train_throughput "${gpu[@]}" --random-base smollm2-135m "${train[@]}" \
  --repeats 2 --set data.padding_free=true
if [ ${#gpu[@]} -gt 0 ]; then  # a 1B fp32 step takes about a minute on 2 CPU cores: the dry run skips it
  step train_1b -m benchmarks.train_throughput "${gpu[@]}" --random-base llama-1b "${train[@]}" --repeats 2
  # train.attention=flex: one compiled FlexAttention call per layer, padding-free rows, the shared prefix (CUDA only)
  step train_135m_flex -m benchmarks.train_throughput "${gpu[@]}" --random-base smollm2-135m "${train[@]}" \
    --repeats 2 --set train.attention=flex
  step train_1b_flex -m benchmarks.train_throughput "${gpu[@]}" --random-base llama-1b "${train[@]}" --repeats 2 \
    --set train.attention=flex
  for m in dora qlora galore; do  # the other methods against their own bare loops (issue 33)
    step "train_1b_$m" -m benchmarks.train_throughput "${gpu[@]}" --random-base llama-1b "${train[@]}" --repeats 1 \
      --method "$m"
  done
  # the full logits instead of the chunked loss (issue 33, item 6): is chunking a win on a GPU?
  step train_1b_full_logits -m benchmarks.train_throughput "${gpu[@]}" --random-base llama-1b "${train[@]}" \
    --repeats 2 --set train.loss_chunk_tokens=0
fi
step attention -c "import sys; from benchmarks.attention import main; \
sys.exit(max(main([*sys.argv[1:], '--random-base', s]) for s in ('smollm2-135m', 'llama-1b')))" "${gpu[@]}" "${attn[@]}"
step lora_product -c "import sys; from benchmarks.lora_product import main; \
sys.exit(max(main([*sys.argv[1:], '--random-base', 'llama-1b', '--rows', r, '--adapters', '8']) for r in ('8', '32')))" \
  "${gpu[@]}" "${attn[@]}"
if [ ${#gpu[@]} -gt 0 ]; then  # on 2 CPU cores compiling takes minutes a run: the dry run skips these
  step serve_compile_decode -m benchmarks.compile_decode "${gpu[@]}" --random-base llama-1b --repeats 2 --tokens 32
  step serve_1b_compiled -m benchmarks.serving "${gpu[@]}" --random-base llama-1b --compile-decode \
    --sides engine_mixed,engine_base,hf_base "${serve[@]}"
fi
step serve_135m -m benchmarks.serving "${gpu[@]}" --random-base smollm2-135m --sides engine_mixed,engine_base,hf_base \
  "${serve[@]}"
for f in "$out"/train_*.log "$out"/attention.log "$out"/lora_product.log "$out"/serve_*.log; do
  [ -f "$f" ] || continue
  grep '^{' "$f" | sed "s/^/{\"step\": \"$(basename "$f" .log)\", \"result\": /; s/\$/}/" || echo "{\"step\": \"$(basename "$f" .log)\", \"result\": null}"
done > "$out/summary.jsonl"
cat "$out/summary.jsonl"
