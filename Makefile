# The two commands a new user needs: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.imagegate-installed

.PHONY: setup serve test lint bench bench-gpu fuzz clean image

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

# One pytest worker per core, at most 4 (each loads torch and its own tiny model);
# PYTEST_ARGS="tests/test_openai.py -x" runs a part in one process.
PYTEST_ARGS ?= -n auto --maxprocesses 4

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

# The overhead benchmark drives the server with wrk (apt-get install wrk).
bench: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || { echo "make bench needs wrk on PATH (e.g. apt-get install wrk)" >&2; exit 2; }
	$(PY) -m bench.run $(ARGS)

# Full-size SDXL (random weights) on a CUDA GPU: bare vs served, compile, FP8 (bench/gpu_e2e.py).
bench-gpu: $(STAMP)
	OUT=$${OUT:-bench/results/latest} $(PY) -m bench.gpu_e2e $(ARGS)

# Container images: imagegate:<version> (CUDA, Dockerfile) and imagegate:<version>-cpu
# (tiny-sdxl on CPU, Dockerfile.cpu). Needs a running docker daemon.
IMAGE ?= imagegate
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

image:
	@command -v docker >/dev/null 2>&1 || { echo "make image: no docker command on this machine; install Docker to build the images (tests/test_deploy.py checks the Dockerfiles without it)." >&2; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "make image: no running docker daemon (docker info failed); start Docker and run make image again." >&2; exit 1; }
	docker build -f Dockerfile -t $(IMAGE):$(IMAGE_TAG) .
	docker build -f Dockerfile.cpu -t $(IMAGE):$(IMAGE_TAG)-cpu .

# schemathesis against the served /openapi.json, fake runner: FUZZ_EXAMPLES cases per operation
# (every dialect has 3 or more operations, so >= 1,000 cases per dialect by default).
FUZZ_EXAMPLES ?= 400
fuzz: $(STAMP)
	$(PY) -m tests.fuzz --max-examples $(FUZZ_EXAMPLES) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
