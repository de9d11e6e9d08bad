# The two commands a newcomer runs: `make run` and `make test`. Both build .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint install bench-peer

TOOLS := $(VENV)/tools

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# MONAI Label's Python client, as its users call it; the package's training stack (monai,
	# torch builds, itk) is not what the client needs: it imports requests and the standard library
	$(BIN)/pip install --quiet --no-deps -c constraints.txt monailabel
	# perf_analyzer as tritonclient shipped it (2.51 is the last wheel with the binary that runs on
	# Debian 12's glibc; it pins numpy<2, so it lives apart from the venv): the binary only, with the
	# CUDA runtime it links even on a CPU; the test adds apt's libb64-0d
	$(BIN)/pip install --quiet --no-deps --target $(TOOLS) tritonclient==2.51.0 nvidia-cuda-runtime-cu12==12.9.79
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/carseg serve

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# bench/peer.py: carseg against Ray Serve side by side. Ray and its dependencies live in a venv of
# their own (the optional extra `bench`), never in the one `make run` and `make test` use
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet -c constraints.txt -e '.[bench]'
	touch $@

bench-peer: $(BENCH_VENV)/.installed
	OMP_WAIT_POLICY=PASSIVE $(BENCH_VENV)/bin/python bench/peer.py
