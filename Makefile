# The two commands a new user needs: `make demo` (the demo pipeline) and `make test` (the test suite).
# Both install the project into the active Python environment first (once; see scripts/setup.sh).
PYTHON ?= python3
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test test-all lint data

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

demo: setup
	$(PYTHON) -m rlhf.cli run configs/demo/pipeline.yaml

test: setup
	$(PYTHON) -m pytest -m "not slow" -q

lint: setup
	$(PYTHON) -m ruff check .

test-all: setup
	$(PYTHON) -m pytest -q

data: setup
	$(PYTHON) -m rlhf.world.generate_data --out data/demo
	$(PYTHON) -m reward_models.pairs --out data/demo/preferences_example.jsonl
