# The two commands: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cleanroom-installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: help install demo test test-fast lint services clean-demo

help:
	@echo "make demo   - install, start the embedded service, purify a backdoored MNIST model over HTTP"
	@echo "make test   - install, start PostgreSQL and Redis, run the whole test suite"
	@echo "make install, make services, make lint (ruff), make test-fast (without the slow end-to-end tests)"

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-installs only when the packaging changes: a second run is instant.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(STAMP)

services:
	@scripts/start_services.sh

demo: install
	@PATH="$(abspath $(VENV))/bin:$$PATH" scripts/demo.sh

lint: install
	$(VENV)/bin/ruff check .

test: install services lint
	$(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

test-fast: install services
	$(PY) -m pytest -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

clean-demo:
	rm -rf var/demo
