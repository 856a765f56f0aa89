# lambdalake — the whole set-up is `make demo` and `make test`; everything else is a step.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
UV_VERSION := 0.13.8
CACHE_DIR ?= $(HOME)/.cache/lambdalake
UV := $(CACHE_DIR)/tools/uv-$(UV_VERSION)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
# The environment is rebuilt only when the lock file changes. uv's cache (~/.cache/uv) keeps
# every downloaded wheel, so a second clone on the same machine links instead of downloading.
LOCK_HASH := $(shell sha256sum requirements.lock | cut -c1-16)
STAMP := $(VENV)/.installed-$(LOCK_HASH)
TEST_ARGS ?=

.PHONY: help install jars lock up down status check test unit demo clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(UV):
	$(PYTHON) -m venv $(CACHE_DIR)/tools/uv-$(UV_VERSION)
	$(CACHE_DIR)/tools/uv-$(UV_VERSION)/bin/pip install -q uv==$(UV_VERSION)

$(STAMP): requirements.lock setup.cfg | $(UV)
	infra/bootstrap/system-packages.sh
	$(UV) venv --allow-existing -q --python $(PYTHON) $(VENV)
	VIRTUAL_ENV=$(VENV) $(UV) pip sync requirements.lock
	VIRTUAL_ENV=$(VENV) $(UV) pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) jars  ## install Debian packages, the pinned Python environment and the JVM jars

jars: $(STAMP)  ## fetch the Kafka broker and Spark extra jars with Maven into the state dir
	$(BIN)/lambdalake jars

lock: | $(UV)  ## re-resolve requirements.in into requirements.lock
	$(UV) pip compile requirements.in -o requirements.lock --python-version 3.11 \
	  --python-platform x86_64-unknown-linux-gnu --generate-hashes -q

up: install  ## start Kafka, Redis, MLflow, Ray (Serve) and Airflow on 127.0.0.1
	$(BIN)/lambdalake up

down:  ## stop every service the platform started
	@if [ -x $(BIN)/lambdalake ]; then $(BIN)/lambdalake down; fi

status:  ## health and URL of each service
	$(BIN)/lambdalake status

unit: install  ## the unit tests only (no services)
	$(BIN)/pytest tests/unit $(TEST_ARGS)

check: install  ## the code checks: layering contracts (import-linter), lint (ruff), types (mypy --strict)
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/mypy

test: install check  ## the code checks, then the whole suite: unit tests and integration tests against real services
	$(BIN)/pytest tests $(TEST_ARGS)

demo: up  ## start the platform and run the whole architecture end to end (Airflow batch + training, speed layer, API, SQL, /predict, exact-merge check)
	$(BIN)/lambdalake demo

clean: down  ## remove the local state (Kafka data, Delta tables, MLflow, Airflow) and the venv
	rm -rf var $(VENV)
