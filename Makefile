# Quick start: `make train` (install everything, run pdml-train on the built-in data)
#              `make test`  (install everything, run the tests)
# Everything installs into $(VENV); the extension pdml._C is built against its torch.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.pdml-installed
SOURCES := pyproject.toml setup.py $(shell find csrc -type f 2>/dev/null)

.PHONY: install train test test-tools bench
install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip setuptools wheel ninja
	$(BIN)/python -m pip install -q "torch>=2.4"
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[test]'
	touch $@

train: install
	$(BIN)/pdml-train $(ARGS)

test: install test-tools
	$(BIN)/python -m pytest tests $(ARGS)

# dciodvfy (Debian's dicom3tools) validates the DICOM files pdml writes (tests/test_data_dicom.py)
test-tools:
	command -v dciodvfy >/dev/null || { apt-get update -qq && apt-get install -y -qq dicom3tools; }

bench: install
	$(BIN)/python -m pytest benchmarks $(ARGS)
