# The README's two commands: `make train` (the main job) and `make test` (the test suite).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTHON ?= python3

.PHONY: test test-slow train lint bench-quick clean mutants zoo gpu-dry

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# The default run (one worker per core) leaves out the tests marked slow; test-slow runs only those.
test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n auto

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

train: $(STAMP)
	$(VENV)/bin/gpipe train --out runs/lm --trace

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

bench-quick: $(STAMP)
	$(PY) benchmarks/local_throughput.py --quick

# The prepared GPU check (benchmarks/gpu.sh) in its CPU dry mode, so it cannot rot unseen.
gpu-dry: $(STAMP)
	GPU_DRY=1 PYTHON=$(PY) bash benchmarks/gpu.sh gpu-dry-results

# The whole model zoo (tests/integration/test_zoo.py): every architecture and habit, DistributedPipe included.
zoo: $(STAMP)
	GPIPE_ZOO=all $(PY) -m pytest -q -m '' tests/integration/test_zoo.py

# Mutation score of the core modules (docs/mutation.md); not part of `test`. MODULES=schedules ...
mutants: $(STAMP)
	nice -n 10 $(PY) tools/mutants.py $(MODULES)

clean:
	rm -rf $(VENV) runs .pytest_cache
