# framebridge: `make demo` builds shards from the embedded synthetic dataset and trains on them; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
DEMO   ?= demo_out
# the demo trains the tiny UNet at 32 px (area-downsampled on load): a few minutes on 2 cores
# (EMA 0.99: the paper's 0.9995 averages over ~2000 steps, longer than the demo's 300)
DEMO_TRAIN ?= --preset tiny --image-size 32 --max-steps 300 --ema 0.99 --val-every 50 --diag-every 100 --ckpt-every 100 --keep 5 --no-progress
# the demo scores samples with the offline extractor (a fixed small network: not FID)
DEMO_EVAL ?= --all --once --n 128 --steps 20 --extractor offline --n-ref 256

.PHONY: install demo test lint format bench clean lock

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/pipeline build --src synthetic --out $(DEMO)/shards
	$(VENV)/bin/pipeline validate $(DEMO)/shards
	$(VENV)/bin/pipeline inspect $(DEMO)/shards --out $(DEMO)/inspect.png
	$(PY) -m train --shards $(DEMO)/shards --out $(DEMO)/runs/flow --method flow $(DEMO_TRAIN) --batch 16
	$(PY) -m train --shards $(DEMO)/shards --out $(DEMO)/runs/iid --method iid $(DEMO_TRAIN) --batch 48
	$(PY) -m eval watch $(DEMO)/runs/flow $(DEMO_EVAL)
	$(PY) -m eval watch $(DEMO)/runs/iid $(DEMO_EVAL)
	$(PY) -m eval report $(DEMO)/runs/flow $(DEMO)/runs/iid --out $(DEMO)/report

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

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

# docker/requirements.lock: the image's pinned, hashed dependencies (CPython 3.11, Linux x86_64),
# resolved by uv from a venv of its own (never the project's)
LOCK_VENV ?= /tmp/framebridge-lock
UV_VERSION ?= 0.13.9

lock:
	test -x $(LOCK_VENV)/bin/uv || { $(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install -q uv==$(UV_VERSION); }
	$(LOCK_VENV)/bin/uv pip compile -q pyproject.toml docker/requirements.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --output-file docker/requirements.lock

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
