# The two commands a new user needs: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.imagegate-installed

.PHONY: setup serve test lint bench fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned to the CPU build these machines carry; pyproject keeps a range.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/imagegate serve $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

# The overhead benchmark drives the server with wrk (apt-get install wrk).
bench: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || { echo "make bench needs wrk on PATH (e.g. apt-get install wrk)" >&2; exit 2; }
	$(PY) -m bench.run $(ARGS)

# schemathesis against the served /openapi.json, fake runner: FUZZ_EXAMPLES cases per operation
# (every dialect has 3 or more operations, so >= 1,000 cases per dialect by default).
FUZZ_EXAMPLES ?= 400
fuzz: $(STAMP)
	$(PY) -m tests.fuzz --max-examples $(FUZZ_EXAMPLES) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
