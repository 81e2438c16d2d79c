# Quick start: `make train` (install everything, run pdml-train on the built-in data)
#              `make test`  (install everything, run the tests)
# Everything installs into $(VENV); the extension pdml._C is built against its torch.
# The versions installed are the ones tested together: tools/constraints.txt (pip -c).
#
# A GPU machine without internet access (docs/gpu.md):
#   make gpu-wheels          the wheels its image lacks, for its CPython 3.12, into .whl/
#   make rehearse-gpu-image  the GPU run rehearsed here with the image's torch/triton (CI runs it)
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.pdml-installed
CONSTRAINTS := tools/constraints.txt
SOURCES := pyproject.toml setup.py $(CONSTRAINTS) $(shell find csrc -type f 2>/dev/null)

.PHONY: install train test test-tools bench gpu-wheels rehearse-gpu-image
install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip setuptools wheel ninja
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) torch "triton; platform_system == 'Linux'" numpy
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) --no-build-isolation -e '.[test,classical]'
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

# --------------------------------------------------------------------------- GPU image
# What the GPU machine's image has (torch 2.11.0 cu130, triton 3.6.0, numpy 2.5, nvcc 13.0,
# CPython 3.12; no registry there; tools/gpu-image-requirements.txt) and which of pdml's
# requirements it lacks.
GPU_IMAGE_HAS := numpy torch triton scipy scikit-image matplotlib tqdm nvidia-ml-py pytest pytest-benchmark
GPU_IMAGE_LACKS := pydicom pydicom-data pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg PyWavelets platformdirs bm3d bm4d
GPU_IMAGE_PY ?= 3.12
WHEELS ?= .whl
# manylinux tags pip must match exactly; the image's glibc is 2.39 (Ubuntu 24.04)
MANYLINUX := $(foreach n,17 24 26 27 28 31 34 35 36 37 38 39,--platform manylinux_2_$(n)_x86_64) \
	--platform manylinux2014_x86_64

# The commit is rewritten every time: the device machine gets the tree without .git. A
# pdml._C that part1 returned ($(WHEELS)/_C.abi3.so, reused by part2) goes with a new commit.
gpu-wheels: $(WHEELS)/.downloaded-cp$(GPU_IMAGE_PY)
	commit=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown); \
	git diff --quiet HEAD -- 2>/dev/null || commit=$$commit-dirty; \
	[ "$$commit" = "$$(cat $(WHEELS)/COMMIT 2>/dev/null)" ] || rm -f $(WHEELS)/_C.abi3.so; \
	printf %s "$$commit" > $(WHEELS)/COMMIT
	@echo "$(WHEELS): $$(ls $(WHEELS)/*.whl | wc -l) wheels, $$(du -sh $(WHEELS) | cut -f1), commit $$(cat $(WHEELS)/COMMIT)"

$(WHEELS)/.downloaded-cp$(GPU_IMAGE_PY): $(CONSTRAINTS)
	mkdir -p $(WHEELS)
	rm -f $(WHEELS)/*.whl $(WHEELS)/.downloaded-*
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --implementation cp \
	  --python-version $(GPU_IMAGE_PY) $(MANYLINUX) -c $(CONSTRAINTS) -d $(WHEELS) $(GPU_IMAGE_LACKS)
	$(PYTHON) tools/check_wheels.py $(WHEELS) --want $(GPU_IMAGE_LACKS) --present $(GPU_IMAGE_HAS)
	touch $@

# The rehearsal: a second venv with the image's versions (CPython 3.12 where this machine
# has one, torch 2.11.0 with its CUDA 13 wheels, triton 3.6.0, the registry's newest
# numpy <= 2.5, the image's other packages) and the wheels of `make gpu-wheels` for its
# Python installed WITHOUT the registry. In a copy of the tree (as the device machine gets
# it) it runs `benchmarks/run_gpu.sh all --dry` strictly (nvcc build for sm_90 against
# torch 2.11, import of every data dependency, pytest -m cuda tests/ with each cuda test
# collected and skipped, benchmark collection, a tiny training run), then compiles every
# Triton kernel for sm_90 with triton 3.6 (python -m pdml.kernels.aot --arch 90 --strict:
# fails on a compile error, a register spill or shared memory over the limit).
# Re-runs are cheap: the venv, the wheels and the check each have a stamp; the copy keeps
# its ninja build folder.
GPU_IMAGE_VENV ?= .venv-gpu-image
# (a candidate counts only if it runs: pyenv's shim is on the PATH but may refuse)
GPU_IMAGE_PYTHON ?= $(firstword $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12; do \
	"$$p" -c "" 2>/dev/null && command -v "$$p"; done) $(PYTHON))
GPU_IMAGE_REQUIREMENTS := tools/gpu-image-requirements.txt
REHEARSAL_TREE := $(GPU_IMAGE_VENV)/tree
REHEARSAL_SOURCES := $(shell git ls-files 2>/dev/null)

rehearse-gpu-image: $(GPU_IMAGE_VENV)/.rehearsed

$(GPU_IMAGE_VENV)/.installed: $(GPU_IMAGE_REQUIREMENTS)
	rm -rf $(GPU_IMAGE_VENV)/bin $(GPU_IMAGE_VENV)/lib $(GPU_IMAGE_VENV)/include
	$(GPU_IMAGE_PYTHON) -m venv $(GPU_IMAGE_VENV)
	$(GPU_IMAGE_VENV)/bin/python -m pip install -q -U pip setuptools wheel ninja
	$(GPU_IMAGE_VENV)/bin/python -m pip install -q -r $(GPU_IMAGE_REQUIREMENTS)
	$(GPU_IMAGE_VENV)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|triton|numpy|scipy|scikit-image|matplotlib|pytest) "
	touch $@

$(GPU_IMAGE_VENV)/.wheels: $(GPU_IMAGE_VENV)/.installed $(CONSTRAINTS)
	$(MAKE) --no-print-directory gpu-wheels WHEELS=$(GPU_IMAGE_VENV)/wheels \
	  GPU_IMAGE_PY=$$($(GPU_IMAGE_VENV)/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
	touch $@

$(GPU_IMAGE_VENV)/.rehearsed: $(GPU_IMAGE_VENV)/.installed $(GPU_IMAGE_VENV)/.wheels $(REHEARSAL_SOURCES)
	@echo "rehearsal on $$($(GPU_IMAGE_VENV)/bin/python -c 'import sys, torch, triton, numpy; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")')"
	mkdir -p $(REHEARSAL_TREE)
	find $(REHEARSAL_TREE) -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
	git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C $(REHEARSAL_TREE)
	cd $(REHEARSAL_TREE) && PYTHON=$(abspath $(GPU_IMAGE_VENV))/bin/python \
	  PDML_WHEELS=$(abspath $(GPU_IMAGE_VENV))/wheels PDML_SITE=$(abspath $(GPU_IMAGE_VENV))/site \
	  PDML_COMMIT=$$(cat $(abspath $(GPU_IMAGE_VENV))/wheels/COMMIT) RESULTS_NAME=rehearsal \
	  PDML_GPU_STRICT=1 PART1_BUDGET=2400 PART2_BUDGET=600 BUILD_BUDGET=1800 \
	  CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$${MAX_JOBS:-2} \
	  bash benchmarks/run_gpu.sh all --dry
	cd $(REHEARSAL_TREE) && PYTHONPATH=.:$(abspath $(GPU_IMAGE_VENV))/site $(abspath $(GPU_IMAGE_VENV))/bin/python -m pdml.kernels.aot --arch 90 --strict --jobs $${MAX_JOBS:-2}
	touch $@
