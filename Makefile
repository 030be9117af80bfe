# densenet-xf: `make conformance` (the main job) and `make test` each do all the set-up on a
# fresh machine. `make setup` builds .venv once and is a quick no-op afterwards.
#
# PYTHON_ENV=system runs every target with the Python that is already there ($(PYTHON)) instead:
# no venv, nothing installed or downloaded, the project imported from this checkout. It first
# lists what that Python lacks (python -m conformance.environment); a backend whose framework
# is missing is reported as skipped; Fashion-MNIST is looked for in DENSENET_XF_DATA, the
# checkout's .device-data/, /usr/share/datasets/fashion-mnist and the download cache.

PYTHON ?= python3
PYTHON_ENV ?= venv
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done
DEVICE ?= cpu
PYTEST_ARGS ?=

ifeq ($(PYTHON_ENV),venv)
PY          := $(VPY)
READY       := setup
TEST_READY  := setup lint data browser
ENSURE      := --ensure
REQUIRE_ALL := --require-all
else ifeq ($(PYTHON_ENV),system)
PY          := PYTHONPATH=$(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH)) $(PYTHON)
READY       := environment
TEST_READY  := environment data
ENSURE      :=
REQUIRE_ALL :=
else
$(error PYTHON_ENV must be venv (the default: .venv, built by make setup) or system (the Python already there), not '$(PYTHON_ENV)')
endif
CLI := $(PY) -m conformance

# The pinned recipe from shared/DESIGN.md: these versions install together in one venv.
# torch==2.13.0 resolves to a CPU build; MXNet 1.9.1 declares numpy<2, so it comes second,
# without dependencies, and densenet_mxnet restores the NumPy names it reads.
# setuptools: MXNet imports distutils, which Python 3.12 no longer ships.
# Other version sets (the GPU machine's, the newest) are tested by `make compat` (docs/compat.md).
FRAMEWORKS := torch==2.13.0 tensorflow-cpu==2.21.0 jax==0.10.2 jaxlib==0.10.2 flax==0.12.8 optax==0.2.8 setuptools
MXNET      := mxnet==1.9.1 graphviz==0.8.4

.PHONY: setup environment data lint test test-all conformance results bench docs docs-serve browser clean \
	compat gpu-check gpu-check-publish

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(VPY) -m pip install -q $(FRAMEWORKS)
	$(VPY) -m pip install -q --no-deps $(MXNET)
	$(VPY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# What the Python in use offers (core packages, frameworks, tools); fails, listing them, if a core package is missing.
environment:
	@$(PY) -m conformance.environment --quiet

# Fashion-MNIST when missing: the Debian package (root or sudo -n), else the checked download.
# With PYTHON_ENV=system it is only looked for: nothing is installed or downloaded.
data: $(READY)
	$(PY) -m conformance.data $(ENSURE)

# ruff: lint and formatting, configured in pyproject.toml (`ruff format .` fixes the formatting).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# pytest exits 5 when it collected no tests: that fails the target, with a message.
test: $(TEST_READY)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

test-all: $(READY) data
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

# Every backend in its own process; fails if any check fails or any backend is missing
# (with PYTHON_ENV=system a missing framework is a skipped backend).
conformance: $(READY) data
	$(CLI) conformance --device $(DEVICE) $(REQUIRE_ALL)

# The same, and the report is copied to docs/results/ (commit it to publish it).
results: $(READY) data
	$(CLI) conformance --device $(DEVICE) $(REQUIRE_ALL) --publish docs/results

# Each backend's trainer (fp32, tf32, bf16) timed against the d2l book's code for its framework
# (bench/anchors/), in one run: build/bench/bench.md, .json, .png; then densenet121 plain against memory-efficient:
# build/bench/memory_$(DEVICE).md, .json, .png; then 1 device against 2, data-parallel: scaling_$(DEVICE).*.
# BENCH_ARGS: e.g. --quick, --section memory (or speed, scaling), --publish docs/results
BENCH_ARGS ?=
bench: $(READY) data
	$(CLI) bench --device $(DEVICE) --out build/bench $(BENCH_ARGS)

# A GPU machine without network, in about 8 minutes (docs/gpu.md): environment, conformance on the GPU,
# the d2l recipe trained, bench's speed and memory sections, each phase time-boxed, into build/gpu-check/.
# GPU_CHECK_ARGS: e.g. --rehearse (tiny sizes on the CPU), --budget 480, --backends torch,jax
GPU_CHECK_ARGS ?=
gpu-check: $(READY) data
	$(PY) -m conformance.gpucheck --out build/gpu-check $(GPU_CHECK_ARGS)

# Copy a GPU check's results (GPU_CHECK_OUT, default build/gpu-check) into docs/results/gpu/.
GPU_CHECK_OUT ?= build/gpu-check
gpu-check-publish: $(READY)
	$(PY) -m conformance.gpucheck.publish $(GPU_CHECK_OUT) docs/results/gpu

# Another version set in a venv of its own (.compat/VERSIONS/), its fast contract tests and
# `densenet-xf check` on a small matrix; results in build/compat/, the table in docs/compat.md.
# VERSIONS: pins (the Makefile's, in .venv), gpu (the GPU machine's as CPU builds), newest.
VERSIONS ?= pins
compat: $(READY) data
	$(PY) -m conformance.compat run $(VERSIONS)

# The teaching site (mkdocs.yml) into build/site; its code is cut from the backends and its
# snippets run while it builds. docs/side_by_side.md is rewritten from the four model.py files.
docs: setup
	$(VPY) -m conformance.site.listing
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
