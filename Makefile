# framebridge: `make demo` builds shards from the embedded synthetic dataset and trains on them; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
DEMO   ?= demo_out
# the demo's build: the synthetic HanCo-format set, with a quarter of its sequences held out
DEMO_BUILD ?= --src synthetic --synth-sequences 16 --val-fraction 0.25
# the demo trains the cpu-short recipe (train/recipes.py; how it was chosen: docs/recipes.md)
DEMO_TRAIN ?= --recipe cpu-short --val-every 100 --diag-every 0 --ckpt-every 100 --keep 3 --no-progress
# final EMA samples: DDIM 50 steps with eta 1 (ancestral noise: see docs/recipes.md), x0 clipped
DEMO_SAMPLE ?= --n 128 --steps 50 --eta 1 --no-progress
# the two runs train side by side, one thread each (more images/s on 2 cores than one after the other)
DEMO_RUNS = flow iid

.PHONY: install demo test test-fast lint format bench clean lock

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/pipeline build $(DEMO_BUILD) --out $(DEMO)/shards
	$(VENV)/bin/pipeline validate $(DEMO)/shards
	$(VENV)/bin/pipeline inspect $(DEMO)/shards --out $(DEMO)/inspect.png
	$(MAKE) --no-print-directory -j2 --output-sync=target $(DEMO_RUNS:%=demo-run-%)
	$(PY) -m eval generation flow=$(DEMO)/samples/flow iid=$(DEMO)/samples/iid --shards $(DEMO)/shards \
		--out $(DEMO)/generation.json --grid $(DEMO)/samples/grid.png
	$(PY) -m eval report $(DEMO)/runs/flow $(DEMO)/runs/iid --out $(DEMO)/report

# one demo run: train the recipe, then sample its final EMA weights (OMP_NUM_THREADS=1: two at once)
demo-run-%:
	OMP_NUM_THREADS=1 $(PY) -m train --shards $(DEMO)/shards --out $(DEMO)/runs/$* --method $* $(DEMO_TRAIN)
	OMP_NUM_THREADS=1 $(PY) -m eval sample --run $(DEMO)/runs/$* --out $(DEMO)/samples/$* $(DEMO_SAMPLE)

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

# lint and the tests not marked slow (no Ray cluster, no torchrun); CI runs `make test`
test-fast: lint
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) bench/build_throughput.py
	$(PY) bench/build_memory.py
	$(PY) bench/plan_scale.py
	$(PY) bench/discover_scale.py
	$(PY) bench/train_throughput.py
	$(PY) bench/generation.py

# docker/requirements.lock: the image's pinned, hashed dependencies (CPython 3.11, Linux x86_64),
# resolved by uv from a venv of its own (never the project's)
LOCK_VENV ?= /tmp/framebridge-lock
UV_VERSION ?= 0.13.9

lock:
	test -x $(LOCK_VENV)/bin/uv || { $(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install -q uv==$(UV_VERSION); }
	$(LOCK_VENV)/bin/uv pip compile -q pyproject.toml docker/requirements.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --output-file docker/requirements.lock

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
