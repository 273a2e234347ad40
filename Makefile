# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned exactly (2.13.0): this machine serves the CPU build from local disk.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps stripedhyena==0.2.2
	touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/chimera train configs/runs/demo.yaml --run-dir runs/demo
	$(BIN)/chimera generate runs/demo --prompt "def " --max-new-tokens 200 --temperature 0.7 --top-k 40

# Two pytest workers, one test file each at a time (a file's shared fixtures are computed once): on 2 cores the
# multi-process tests leave a core idle while processes start, which the other worker fills.
test: $(STAMP)
	$(BIN)/python -m pytest -q -x -n 2 --dist loadfile tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs
