# The two commands of the README: `make run` and `make test`.
# Both install what they need first (SoftHSM2 and PostgreSQL through apt-get, Python dependencies
# into .venv). `make test` runs the suite on SQLite, then the service tests marked `vendors`
# again on the NSS softokn (the second PKCS#11 vendor, tests/nss.py), then the tests marked
# `database` (service, API, stores, credentials, audit) again on a throwaway PostgreSQL server
# (tests/postgres.py).
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test coverage test-postgresql lint bootstrap bench clean clean-data
# Two pytest-xdist workers, one per core of the CI machine; a test module runs whole on one
# (its module fixtures, servers and tokens, made once). The NSS pass stays in one process: all
# its modules use the one NSS database (tests/nss.py).
XDIST = -n 2 --dist loadfile
PYTEST_RC = || { rc=$$?; [ $$rc -eq 5 ] && exit 1; exit $$rc; }

bootstrap:
	@ci/bootstrap.sh

run: bootstrap
	$(BIN)/hsmkms serve

# Coverage options of the three passes: none for `make test` (see `coverage`).
COV_FIRST =
COV_NEXT =
COV_LAST =

test: bootstrap
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict
	$(BIN)/pytest $(XDIST) $(COV_FIRST) $(PYTEST_ARGS) $(PYTEST_RC)
	HSMKMS_TEST_TOKEN=nss $(BIN)/pytest -m vendors $(COV_NEXT) $(PYTEST_ARGS) $(PYTEST_RC)
	HSMKMS_TEST_DATABASE=postgresql $(BIN)/pytest $(XDIST) $(COV_LAST) $(PYTEST_ARGS) $(PYTEST_RC)

# `make test` with line and branch coverage of hsmkms (the pytest processes, not the servers and
# commands they start), printed at the end. The tracer about doubles the time of the tests that
# run hsmkms in the pytest process (tests/test_service_keys.py and test_policy_evaluate.py:
# 16 s, 30 s with it), so `make test` goes without.
coverage: COV_FIRST = --cov --cov-branch --cov-report=
coverage: COV_NEXT = --cov --cov-append --cov-branch --cov-report=
coverage: COV_LAST = --cov --cov-append --cov-branch --cov-report=term:skip-covered
coverage: test

test-postgresql: bootstrap
	HSMKMS_TEST_DATABASE=postgresql $(BIN)/pytest $(PYTEST_ARGS) $(PYTEST_RC)

lint: bootstrap
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict

bench: bootstrap
	$(BIN)/python benchmarks/keystore.py

# Caches and the virtualenv only: the data directory holds the embedded token, the only copy of
# every key (hsmkms backup makes another).
clean:
	rm -rf $(VENV) .cache .mypy_cache .pytest_cache .ruff_cache .coverage
	@if [ -d .hsmkms ]; then echo "kept .hsmkms (the embedded token: every key); 'make clean-data' deletes it"; fi

clean-data:
	@echo "deleting .hsmkms: the embedded SoftHSM2 token with every key in it, the database and the audit trail"
	rm -rf .hsmkms
