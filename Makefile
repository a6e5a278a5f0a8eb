# The README's two commands: `make demo` (set up + run the two-party demo) and `make test` (set up + run the tests).
SHELL := /bin/bash
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# The tests' PostgreSQL and Redis: used when they answer, else `make test` starts throwaway ones for the run
# (scripts/test_services.py: PostgreSQL and Redis from PyPI wheels, on free ports, removed afterwards).
PG_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test
REDIS_URL ?= $(or $(SCALEOT_TEST_REDIS_URL),redis://127.0.0.1:6379/0)
PY := .venv/bin/python
# Extra demo flags, e.g. `make demo DEMO_ARGS="--steps 200 --train-steps 300"` (or SCALEOT_DEMO_SCALE=4).
DEMO_ARGS ?=
# Docker Compose: the v2 plugin when present, else a standalone docker-compose on PATH, else the binary that
# `make compose-tool` puts into .cache/compose-tool (enough for compose-config; up/down need a Docker engine).
COMPOSE_TOOL_BIN = $(firstword $(wildcard .cache/compose-tool/lib/python3*/site-packages/compose/docker-compose))
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || { command -v docker-compose >/dev/null 2>&1 && echo docker-compose; } || echo "$(or $(COMPOSE_TOOL_BIN),docker-compose)")
COMPOSE_DIR := .cache/compose
COMPOSE_ENV ?= $(COMPOSE_DIR)/compose.env

.PHONY: help setup compose-tool lint demo demo-tiny docs-demo test test-sqlite test-postgres test-demo \
        compose-secrets compose-config compose-up compose-gpu compose-down

help:
	@echo "make demo          set up (.venv, torch: CUDA build with an NVIDIA GPU, else CPU; SmolLM2-135M + corpora from PyPI) and run the two-party demo"
	@echo "make test          set up and run the tests (SQLite, then the database tests on PostgreSQL at PG_URL;"
	@echo "                   throwaway PostgreSQL/Redis are started when none answers at PG_URL / REDIS_URL)"
	@echo "make demo-tiny     the same demo flow on a tiny random model, in about a minute"
	@echo "make lint          ruff (lint + format check) and mypy on the core packages (part of make test)"
	@echo "make docs-demo     rerun the demo and rewrite the README's report and docs/walkthrough.md from it"
	@echo "make test-demo     only the demo / packaging tests (tests/demo)"
	@echo "make compose-secrets / compose-config / compose-up / compose-gpu / compose-down   the docker-compose demo"

setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(PY) scripts/demo.py $(DEMO_ARGS)

demo-tiny: setup
	$(PY) scripts/demo.py --tiny $(DEMO_ARGS)

# Rewrite README's report block and docs/walkthrough.md's transcript from a real demo run (--runs 2: also
# check that a second run with the same seed gives the same figures).
DOCS_DEMO_ARGS ?=
docs-demo: setup
	$(PY) scripts/docs_demo.py $(DOCS_DEMO_ARGS) -- $(DEMO_ARGS)

# One PostgreSQL and one Redis for both passes: the inner targets find them answering at the URLs passed on.
test: setup compose-tool lint
	$(SERVICES) --postgres --redis -- bash -c \
	  '$(MAKE) --no-print-directory test-sqlite test-postgres PG_URL="$$PG_URL" REDIS_URL="$$REDIS_URL"'

# Lint and format check (ruff) and type check of the core packages (mypy); configuration in pyproject.toml.
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

# Docker Compose for the compose config test: from PyPI into the tool venv .cache/compose-tool when none is
# installed (never apt, never root); without it the test checks docker-compose.yml's structure itself.
compose-tool:
	@bash scripts/ensure_compose.sh

# Runs a command with PG_URL / REDIS_URL (and SCALEOT_TEST_REDIS_URL) of services that answer, starting
# throwaway ones where none does; never skips (see the README's Tests section).
SERVICES = $(PY) scripts/test_services.py --pg-url '$(PG_URL)' --redis-url '$(REDIS_URL)'
# Extra pytest arguments for test-sqlite / test-postgres, e.g. TEST_ARGS="tests/server/test_jobs.py -x".
# Those two expect .venv (`make setup`; `make test` sets up first, so it is not redone for each pass).
TEST_ARGS ?=

# The whole suite on SQLite. The Redis queue tests must run, not skip (SCALEOT_REQUIRE_REDIS=1).
test-sqlite:
	$(SERVICES) --redis -- env SCALEOT_REQUIRE_REDIS=1 $(PY) -m pytest -q --durations=15 $(TEST_ARGS)  # names the slowest tests at the end

# The database-backed tests again, against PostgreSQL (and the Redis queue tests among them).
test-postgres:
	$(SERVICES) --postgres --redis -- bash -c \
	  'SCALEOT_TEST_DATABASE_URL="$$PG_URL" SCALEOT_REQUIRE_REDIS=1 exec $(PY) -m pytest -q -m db $(TEST_ARGS)'

test-demo: setup
	$(PY) -m pytest -q tests/demo

# ---- docker-compose demo (needs a Docker engine; nothing here is baked into an image)

# Random database and Redis passwords and an Ed25519 signing key, outside git (.cache/ is ignored). The key
# file is made readable for the container's user (uid 10001); its folder stays private to you. A setting the
# env file lacks (e.g. REDIS_PASSWORD in one written before it existed) is added; existing ones are kept.
# Hex passwords: they go into the queue URL and redis-server's arguments unescaped.
compose-secrets: setup
	@mkdir -p $(COMPOSE_DIR) && chmod 700 $(COMPOSE_DIR)
	@[ -f $(COMPOSE_DIR)/signing_key.pem ] || $(PY) -c "from shared.signing import load_or_create_private_key as k; k('$(COMPOSE_DIR)/signing_key.pem')"
	@chmod 644 $(COMPOSE_DIR)/signing_key.pem
	@umask 077; touch $(COMPOSE_ENV); \
	for var in POSTGRES_PASSWORD REDIS_PASSWORD; do \
	  grep -q "^$$var=." $(COMPOSE_ENV) || printf '%s=%s\n' "$$var" "$$($(PY) -c 'import secrets; print(secrets.token_hex(24))')" >> $(COMPOSE_ENV); \
	done; \
	grep -q '^SIGNING_KEY_FILE=.' $(COMPOSE_ENV) || printf 'SIGNING_KEY_FILE=%s\n' "$(abspath $(COMPOSE_DIR))/signing_key.pem" >> $(COMPOSE_ENV)
	@echo "$(COMPOSE_ENV) holds POSTGRES_PASSWORD, REDIS_PASSWORD, SIGNING_KEY_FILE"

compose-config: compose-secrets
	$(COMPOSE) --env-file $(COMPOSE_ENV) config -q && echo "docker-compose.yml is valid"

compose-up: compose-secrets
	$(COMPOSE) --env-file $(COMPOSE_ENV) up --build

compose-gpu: compose-secrets
	$(COMPOSE) --env-file $(COMPOSE_ENV) --profile gpu up --build --scale worker=0 --scale client=0

compose-down:
	$(COMPOSE) --env-file $(COMPOSE_ENV) --profile gpu down
