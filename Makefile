# The two commands a new user runs: `make serve` and `make test`. Each makes .venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
ARGS ?=
# Every install is held to constraints.txt: one pinned set of versions, shared with CI and the Modal images.
INSTALL := $(PIP) install -c constraints.txt
# torch + torchvision as a matched pair (versions from constraints.txt). Override on machines with other wheels.
TORCH_PINS ?= torch torchvision
# what the integration tests drive: a real OBS under Xvfb and a real headless Chromium
APT_PACKAGES := obs-studio xvfb xauth chromium chromium-driver fonts-dejavu-core
HAVE_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: serve test test-fast system-deps lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# serve: the core and the OBS companion; the diffusion stack too when a CUDA GPU is present
$(VENV)/.serve-installed: pyproject.toml constraints.txt | $(BIN)/python
ifeq ($(HAVE_GPU),1)
	@echo "installing the server with the diffusion stack (a few minutes the first time)..."
	@$(INSTALL) -q -e '.[diffusion,obs]'
else
	@echo "installing the server (no GPU found: the CPU filter processor)..."
	@$(INSTALL) -q -e '.[obs]'
endif
	touch $@

$(VENV)/.test-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(INSTALL) $(TORCH_PINS)
	$(INSTALL) -e '.[diffusion,obs,modal,dev]'
	touch $@ $(VENV)/.serve-installed

serve: $(VENV)/.serve-installed
	$(BIN)/dreamstream serve $(ARGS)

# apt packages for the integration tests, installed when root and missing
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then echo "system packages present"; \
	elif [ "$$(id -u)" = "0" ]; then echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "not root: integration tests need:$$missing (they skip without them)"; fi

test: system-deps $(VENV)/.test-installed
	$(BIN)/python -m pytest tests -q -rs $(ARGS)

# the edit loop: everything but the minute-long load tests
test-fast: system-deps $(VENV)/.test-installed
	$(BIN)/python -m pytest -q -rs -m "not slow" $(if $(ARGS),$(ARGS),tests)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check service obs_plugin tests benchmarks examples modal_app.py

bench: $(VENV)/.test-installed
	$(BIN)/python benchmarks/relay.py

clean:
	rm -rf $(VENV) .pytest_cache
