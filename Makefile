# framebridge: `make demo` runs the main job on the embedded synthetic dataset; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
DEMO   ?= demo_out

.PHONY: install demo test lint format bench clean

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

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
