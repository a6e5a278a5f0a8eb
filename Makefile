# The README's two commands: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
SHELL := /bin/bash
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
PG_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test

.PHONY: setup demo test test-sqlite test-postgres

setup:
	@bash scripts/bootstrap.sh

demo: setup
	.venv/bin/python scripts/demo.py $(DEMO_ARGS)

test: setup test-sqlite test-postgres

test-sqlite:
	.venv/bin/python -m pytest -q

# The database-backed tests again, against PostgreSQL.
test-postgres:
	SCALEOT_TEST_DATABASE_URL=$(PG_URL) .venv/bin/python -m pytest -q -m db
