PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JS_DIR := tests/js
JS_STAMP := $(JS_DIR)/node_modules/.installed

.PHONY: install run scheduler test chaos lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The JavaScript SDK tests' own dependencies, from their lockfile. Without
# npm they are left out, and those tests skip, instead of failing the build.
$(JS_STAMP): $(JS_DIR)/package.json $(JS_DIR)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		echo "npm ci --prefix $(JS_DIR)"; \
		npm ci --prefix $(JS_DIR) --no-audit --no-fund --prefer-offline && touch $@; \
	else \
		echo "npm not found: $(JS_DIR) not installed, its tests will skip"; \
	fi

install: $(STAMP) $(JS_STAMP)

run: $(STAMP)
	$(BIN)/python -m services.gateway

scheduler: $(STAMP)
	$(BIN)/python -m services.scheduler

test: $(STAMP) $(JS_STAMP)
	$(BIN)/pytest -q

# Every fault scenario at full scale, one at a time (minutes); prints the
# table. Each run's service logs stay under .chaos/ until the next run.
chaos: $(STAMP)
	$(BIN)/pytest -q -m chaos tests/chaos --basetemp=.chaos $(CHAOS_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check shared services tests bench
	$(BIN)/ruff format --check shared services tests bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format shared services tests bench
	$(BIN)/ruff check --fix shared services tests bench

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info baton.db* .chaos
