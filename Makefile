# Plain entry points: `make test` runs the suite, `make serve` starts the demo service.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The runtime install is enough to serve; the test extras (browser driver, schema fuzzer,
# linters) add install time that `make serve` on a fresh machine need not pay.
RUNTIME_STAMP := $(VENV)/.installed-runtime

.PHONY: test test-fast lint serve clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# tools/install.py installs with uv under pip's own index settings (two to three times faster
# than pip for torch's CUDA wheels), falling back to pip; GSP_INSTALLER=pip forces pip.
$(STAMP): pyproject.toml tools/install.py | $(BIN)/python
	$(BIN)/python tools/install.py -e '.[test]'
	touch $(STAMP) $(RUNTIME_STAMP)

$(RUNTIME_STAMP): pyproject.toml tools/install.py | $(BIN)/python
	$(BIN)/python tools/install.py -e .
	touch $(RUNTIME_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --no-cache --check .
	$(BIN)/mypy

# `make serve`: the built-in demo (prepared offline, cached under .cache/demo) on HOST:PORT;
# `GALLERY=/path/to/photos make serve` indexes that folder with the demo model instead.
GALLERY ?=
HOST ?= 127.0.0.1
PORT ?= 8000

serve: $(RUNTIME_STAMP)
	$(BIN)/gsp demo serve --host $(HOST) --port $(PORT) $(if $(GALLERY),--gallery-source "$(GALLERY)")

# `make test` is what CI runs (container tests have their own step in .ci/run); `make test-fast`
# is the inner loop: the same minus the slow, browser and Ray tests (markers in pyproject.toml).
# mypy checks model/, index/ and app/ ([tool.mypy] in pyproject.toml; cache in .cache/mypy).
test: $(STAMP)
	$(BIN)/ruff check --no-cache .
	$(BIN)/mypy
	$(BIN)/python -m pytest -m "not container"

test-fast: $(STAMP)
	$(BIN)/ruff check --no-cache .
	$(BIN)/mypy
	$(BIN)/python -m pytest -m "not slow and not browser and not ray and not container"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .cache/mypy
