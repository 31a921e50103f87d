# The two commands a newcomer runs: `make run` and `make test`. Each creates .venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TQ_CACHE_DIR ?= $(HOME)/.cache/tq

.PHONY: install run test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,models,pipeline]'
	touch $(STAMP)

install: $(STAMP)

# The main job: for now the synthetic benchmark (d=128, b=4, MSE and Prod).
run: $(STAMP)
	mkdir -p results
	$(BIN)/tq bench --workload synthetic --dim 128 --bits 4 --strategy mse --n 65536 --json results/synthetic-d128-b4-mse.json
	$(BIN)/tq bench --workload synthetic --dim 128 --bits 4 --strategy prod --n 65536 --json results/synthetic-d128-b4-prod.json

test: $(STAMP)
	$(BIN)/ruff check tq tests
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .cache results
