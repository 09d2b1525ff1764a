# The two commands of the README: `make run` and `make test`.
# Both install what they need first (SoftHSM2 through apt-get, Python dependencies into .venv).
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bootstrap bench clean

bootstrap:
	@ci/bootstrap.sh

run: bootstrap
	$(BIN)/hsmkms serve

test: bootstrap
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict
	$(BIN)/pytest --cov --cov-branch --cov-report=term:skip-covered $(PYTEST_ARGS) || { rc=$$?; [ $$rc -eq 5 ] && exit 1; exit $$rc; }

lint: bootstrap
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict

bench: bootstrap
	$(BIN)/python benchmarks/keystore.py

clean:
	rm -rf $(VENV) .cache .hsmkms .mypy_cache .pytest_cache .ruff_cache .coverage
