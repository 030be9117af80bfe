# densenet-xf: `make conformance` (the main job) and `make test` each do all the set-up on a
# fresh machine. `make setup` builds .venv once and is a quick no-op afterwards.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done
DEVICE ?= cpu
PYTEST_ARGS ?=

# The pinned recipe from shared/DESIGN.md: these versions install together in one venv.
# torch==2.13.0 resolves to a CPU build; MXNet 1.9.1 declares numpy<2, so it comes second,
# without dependencies, and densenet_mxnet restores the NumPy names it reads.
# setuptools: MXNet imports distutils, which Python 3.12 no longer ships.
FRAMEWORKS := torch==2.13.0 tensorflow-cpu==2.21.0 jax==0.10.2 jaxlib==0.10.2 flax==0.12.8 optax==0.2.8 setuptools
MXNET      := mxnet==1.9.1 graphviz==0.8.4

.PHONY: setup data lint test test-all conformance results bench docs docs-serve browser clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q $(FRAMEWORKS)
	$(PY) -m pip install -q --no-deps $(MXNET)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# Fashion-MNIST when missing: the Debian package (root or sudo -n), else the checked download.
data: setup
	$(PY) -m conformance.data --ensure

# ruff: lint and formatting, configured in pyproject.toml (`ruff format .` fixes the formatting).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# pytest exits 5 when it collected no tests: that fails the target, with a message.
test: setup lint data browser
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

test-all: setup data
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

# Every backend in its own process; fails if any check fails or any backend is missing.
conformance: setup data
	$(VENV)/bin/densenet-xf conformance --device $(DEVICE) --require-all

# The same, and the report is copied to docs/results/ (commit it to publish it).
results: setup data
	$(VENV)/bin/densenet-xf conformance --device $(DEVICE) --require-all --publish docs/results

# Each backend's trainer (fp32, tf32, bf16) timed against the d2l book's code for its framework
# (bench/anchors/), in one run: build/bench/bench.md, .json, .png; then densenet121 plain against memory-efficient:
# build/bench/memory_$(DEVICE).md, .json, .png; then 1 device against 2, data-parallel: scaling_$(DEVICE).*.
# BENCH_ARGS: e.g. --quick, --section memory (or speed, scaling), --publish docs/results
BENCH_ARGS ?=
bench: setup data
	$(VENV)/bin/densenet-xf bench --device $(DEVICE) --out build/bench $(BENCH_ARGS)

# The teaching site (mkdocs.yml) into build/site; its code is cut from the backends and its
# snippets run while it builds. docs/side_by_side.md is rewritten from the four model.py files.
docs: setup
	$(PY) -m conformance.site.listing
	$(VENV)/bin/mkdocs build --strict

docs-serve: setup
	$(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000

# Chromium and its driver for the site's browser test (tests/test_site.py): Debian's packages,
# installed when missing, as root or with sudo -n; without them that test skips, saying why.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO="sudo -n"; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; } \
	  || echo "make browser: could not install chromium and chromium-driver; the browser test will skip" >&2

clean:
	rm -rf build .pytest_cache
