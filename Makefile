# The two commands of the README: `make run` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 8080
DASHBOARDS_PORT ?= 8866
LAB_PORT ?= 8888
HOME_DIR ?= demo-home

.PHONY: run test lint docs format bench bench-tables bench-features hooks clean system-deps

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "python venv module missing: installing python3-venv"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

## system-deps: Debian packages the tests use (a Redis server for the Redis queue, Chromium
## for the dashboards' browser tests, driven by Playwright, and a PostgreSQL server for the
## catalog tests on PostgreSQL)
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server"; \
	  (apt-get install -y -qq redis-server || \
	   (apt-get update -qq && apt-get install -y -qq redis-server)) >/dev/null; }
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium"; \
	  (apt-get install -y -qq chromium || \
	   (apt-get update -qq && apt-get install -y -qq chromium)) >/dev/null; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
	  echo "installing postgresql"; \
	  (apt-get install -y -qq postgresql || \
	   (apt-get update -qq && apt-get install -y -qq postgresql)) >/dev/null; }

## run: demo study, upload server on $(PORT), simulated phones and days, the sensor tables,
## the scheduler, the dashboards on $(DASHBOARDS_PORT) and JupyterLab on $(LAB_PORT); serves
## until Ctrl-C
run: $(STAMP)
	$(BIN)/workbench --home $(HOME_DIR) demo --port $(PORT) --dashboards-port $(DASHBOARDS_PORT) \
	  --lab-port $(LAB_PORT)

## test: the whole suite (pytest exits non-zero when no test is collected)
test: $(STAMP) system-deps
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## docs: the documentation site (docs/, mkdocs.yml) into site/; warnings are errors
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --quiet

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## bench: upload throughput against the parse-and-fsync floor
bench: $(STAMP)
	$(BIN)/python bench/upload.py

## bench-tables: the sensor tables' build against an orjson parse floor, incremental build,
## loading one subject-week and the build's peak memory (2 GB of raw JSON; GB=0.2 for a quick run)
GB ?= 2
bench-tables: $(STAMP)
	$(BIN)/python bench/tables.py --gb $(GB)

## bench-features: behavioural features of 200 subjects x 28 days against one scan of the
## same tables, the incremental run and peak memory (writes about 8 GB under /tmp)
bench-features: $(STAMP)
	$(BIN)/python bench/features.py

## hooks: strip notebook outputs on commit (nbstripout as a git filter)
hooks: $(STAMP)
	$(BIN)/nbstripout --install --attributes .gitattributes

clean:
	rm -rf $(VENV) $(HOME_DIR) .pytest_cache .ruff_cache site
