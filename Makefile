# rembgd: `make run` starts the daemon, `make test` runs the suite.
# Both create .venv, install the package and provision the models offline.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config.yaml
STAMP  := $(VENV)/.installed-stamp
MODELS := var/models/.provisioned

.PHONY: install models run test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

models: $(MODELS)

$(MODELS): $(STAMP)
	$(BIN)/rembgd models install --config $(CONFIG)
	touch $@

run: models
	$(BIN)/rembgd run --config $(CONFIG)

test: models
	$(BIN)/python tests/ensure_redis.py
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: models
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) var build *.egg-info
