# The two commands a newcomer runs: `make run` and `make test`. Each creates .venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TQ_CACHE_DIR ?= $(HOME)/.cache/tq
# pytest-xdist workers of make test (each test file runs whole on one worker).
TEST_WORKERS ?= 2

.PHONY: install run test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,models,pipeline]'
	touch $(STAMP)

install: $(STAMP)

# The main job: the default sweep of config.yaml (Snakefile) into results/, ending in results/report.md.
run: $(STAMP)
	$(BIN)/snakemake --cores all

# The cluster test needs Debian's SLURM packages; the script installs them where it can (root,
# apt) and otherwise says why the test will be skipped. lint-imports checks tq's layers
# (pyproject.toml, [tool.importlinter]).
test: $(STAMP)
	bash scripts/install-slurm-packages.sh
	$(BIN)/ruff check tq tests workflow benchmarks scripts
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) .cache results
