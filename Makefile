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

.PHONY: setup test test-all conformance results docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q $(FRAMEWORKS)
	$(PY) -m pip install -q --no-deps $(MXNET)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# pytest exits 5 when it collected no tests: that fails the target, with a message.
test: setup
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

test-all: setup
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

# Every backend in its own process; fails if any check fails or any backend is missing.
conformance: setup
	$(VENV)/bin/densenet-xf conformance --device $(DEVICE) --require-all

# The same, and the report is copied to docs/results/ (commit it to publish it).
results: setup
	$(VENV)/bin/densenet-xf conformance --device $(DEVICE) --require-all --publish docs/results

# docs/side_by_side.md, cut from the four model.py files.
docs: setup
	$(PY) -m conformance.listing

clean:
	rm -rf build .pytest_cache
