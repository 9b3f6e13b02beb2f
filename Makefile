# rembgd: `make run` starts the daemon, `make test` runs the suite.
# Both create .venv, install the package and provision the models offline.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config.yaml
STAMP  := $(VENV)/.installed-stamp
MODELS := var/models/.provisioned

.PHONY: install models run test bench docs lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

models: $(MODELS)

$(MODELS): $(STAMP)
	$(BIN)/rembgd --config $(CONFIG) models install
	touch $@

# u2netp-int8, quantised from u2netp (offline, ~30-80 s on 2 cores), for the tests only: the
# CI run's one full quantisation, which tests/test_quant.py reuses; a new recipe re-makes it
INT8 := var/models/.int8-provisioned

$(INT8): $(MODELS) daemon/inference/quantize.py
	$(BIN)/rembgd --config $(CONFIG) models install --model u2netp --quantize int8
	touch $@

run: models
	mkdir -p var/inbox var/outbox
	$(BIN)/rembgd --config $(CONFIG) run

test: models $(INT8)
	$(BIN)/python tests/ensure_redis.py
	$(BIN)/pytest -q -p no:cacheprovider

# Benchmarks: every script in BENCHES runs in turn, with BENCH_ARGS (e.g. BENCH_ARGS=--quick).
# rembg's CLI extra (gradio, fastapi...) is for the comparison only: not in the test install.
BENCHES     ?= bench/run.py bench/soak.py bench/camera.py bench/polling_idle.py bench/quality.py
BENCH_ARGS  ?=
BENCH_STAMP := $(VENV)/.bench-stamp

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]' 'rembg[cli]==2.0.86'
	touch $@

bench: models $(BENCH_STAMP)
	@set -e; for b in $(BENCHES); do echo "== $$b $(BENCH_ARGS)"; $(BIN)/python $$b $(BENCH_ARGS); done

# docs/configuration.md is generated from daemon/config/schema.py; tests/test_config_reference.py
# fails until it is regenerated after a config key changes.
docs: $(STAMP)
	$(BIN)/rembgd config reference > docs/configuration.md

clean:
	rm -rf $(VENV) var build *.egg-info
