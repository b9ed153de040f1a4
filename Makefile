# Fresh-machine entry points (README top): `make serve` and `make test`.
# Each creates .venv, installs the project with the CPU build of torch, and the Debian packages
# it needs (fortunes: demo training text; prometheus: monitoring tests and `make monitor`).

VENV ?= .venv
# Evaluation and benchmark clients the end-to-end tests drive (lm-eval, GuideLLM): their own
# venv, as their pins (datasets, click, ...) are theirs, with torch pinned to our CPU wheel.
TOOLS_VENV ?= .venv-tools
TOOLS := 'lm-eval[api]==0.4.13' guidellm==0.8.1
TOOLS_STAMP := $(TOOLS_VENV)/.installed-lm-eval-0.4.13-guidellm-0.8.1
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PORT ?= 8080
PROMETHEUS_PORT ?= 9090
PYTEST_ARGS ?=

# Packages go in with uv (pip-compatible, from PyPI, parallel downloads and bytecode compiling:
# both venvs of a fresh `make test` in 131 s instead of 262 s with pip, measured here). pip
# installs uv into .venv and fetches torch (below); where uv cannot be had, or fails (it reads
# UV_* settings, not pip.conf: a private index), pip does it all. INSTALLER=pip: pip only.
# Bytecode is compiled at install, as pip does: where PYTHONDONTWRITEBYTECODE is set (many
# container images) nothing compiles it later, and every process would compile what it imports
# again (`import torch` 2.3 s -> 5.1 s measured).
INSTALLER ?= uv
UV := $(VENV)/bin/uv
# $(call INSTALL,venv,requirements)
INSTALL = if [ "$(INSTALLER)" = uv ] && [ -x $(UV) ]; then \
		echo "$(UV) pip install -q --compile-bytecode --python $(1)/bin/python $(2)"; \
		$(UV) pip install -q --compile-bytecode --python $(1)/bin/python $(2) || { \
		echo "uv could not install it; pip tries (pip reads pip.conf)"; \
		$(1)/bin/python -m pip install -q $(2); }; \
	else echo "$(1)/bin/python -m pip install -q $(2)"; $(1)/bin/python -m pip install -q $(2); fi

# torch, pinned as in pyproject.toml. On Linux, PyPI's torch wheels are CUDA builds that pull
# several GB of nvidia-* packages; the CPU build has the local version "+cpu" and lives on the
# PyTorch CPU index. Asking for "+cpu" means no index can hand us a CUDA build: a wheel this
# machine's pip already knows (a local mirror, --find-links) is used first, else the CPU index
# is added. Elsewhere (macOS) PyPI's wheels are the CPU builds. pip fetches the wheel, as pip
# knows where this machine keeps its wheels, once into $(TORCH_WHEELS); the installer puts it
# into both venvs (uv: 18 s each, pip: 37 s).
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
TORCH_SPEC := torch==$(TORCH_VERSION)$(if $(filter Linux,$(shell uname -s)),+cpu)
TORCH_WHEELS := $(VENV)/.torch-wheels
TORCH_WHEEL := $(TORCH_WHEELS)/torch-$(TORCH_VERSION)*.whl
FETCH_TORCH = ls $(TORCH_WHEEL) >/dev/null 2>&1 || \
	$(PIP) download -q --no-deps -d $(TORCH_WHEELS) '$(TORCH_SPEC)' 2>/dev/null || \
	$(PIP) download -q --no-deps -d $(TORCH_WHEELS) '$(TORCH_SPEC)' --extra-index-url $(TORCH_INDEX_URL)

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
# apt-get install quietly; $(1) is the package list.
APT_INSTALL = echo "installing Debian packages: $(1)" && $(SUDO) apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(1) >/dev/null

.PHONY: install tools system-deps serve demo monitor test test-fast reliability lint clean

$(VENV)/.installed: pyproject.toml
	@# Debian/Ubuntu ship `venv` without ensurepip unless python3-venv is installed.
	@python3 -c 'import ensurepip, venv' 2>/dev/null || { $(call APT_INSTALL,python3-venv); }
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(if $(filter uv,$(INSTALLER)),$(PIP) install -q 'uv>=0.4' || \
		echo "no uv here: pip installs everything")
	$(FETCH_TORCH)
	@$(call INSTALL,$(VENV),$(TORCH_WHEEL))
	@$(call INSTALL,$(VENV),-e '.[dev]')
	@# text-generation pins huggingface_hub<1 (transformers 5 needs >=1); its client code runs on
	@# either, so it goes in without its pins, next to the aiohttp/pydantic the dev extra brings.
	@$(call INSTALL,$(VENV),--no-deps 'text-generation>=0.7')
	touch $@

# Built after .venv, whose uv installs it.
$(TOOLS_STAMP): | $(VENV)/.installed
	@python3 -c 'import ensurepip, venv' 2>/dev/null || { $(call APT_INSTALL,python3-venv); }
	python3 -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install -q --upgrade pip
	$(FETCH_TORCH)
	@$(call INSTALL,$(TOOLS_VENV),$(TORCH_WHEEL))
	@$(call INSTALL,$(TOOLS_VENV),$(TOOLS))
	touch $@

install: $(VENV)/.installed

tools: $(TOOLS_STAMP)

# g++ and Python's headers build the native CPU decode kernels (x86-64 only; without them the
# server runs torch's kernels).
system-deps:
	@missing=""; \
	[ -d /usr/share/games/fortunes ] || missing="$$missing fortunes"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	if [ "$$(uname -m)" = x86_64 ]; then \
		command -v c++ >/dev/null 2>&1 || missing="$$missing g++"; \
		[ -f "$$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] \
			|| missing="$$missing python3-dev"; \
	fi; \
	if [ -n "$$missing" ]; then $(call APT_INSTALL,$$missing); fi

# The demo models live in $CAMEX_DEMO_DIR (default ~/.cache/camex-serve/demo); `make demo`
# builds what is missing or was built by other code, `make demo FORCE=1` rebuilds both.
demo: install system-deps
	$(PY) -m camex_runtime.training.demo $(if $(FORCE),--force)

serve: install system-deps
	$(VENV)/bin/camex-server --host 127.0.0.1 --port $(PORT)

# Prometheus (Debian binary) with the shipped config and alerts, scraping `make serve`'s server.
monitor: system-deps
	deploy/prometheus/run-local.sh 127.0.0.1:$(PORT) 127.0.0.1:$(PROMETHEUS_PORT)

# Test files run on parallel pytest workers (pytest-xdist), one per core up to 4: each file's
# tests stay in one worker, so its module fixtures (checkpoints, servers) are built once.
# 2 cores: ~14 min instead of ~25. TEST_WORKERS=1 runs them one after another, in one process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
XDIST = $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

test: install tools system-deps
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not e2e and not slow" $(XDIST) $(PYTEST_ARGS)

# The long reliability runs (~25 min on 2 cores; results JSON + table): benchmarks/reliability.
# Their quick versions run with the tests (pytest -m reliability).
reliability: install system-deps
	$(PY) benchmarks/reliability/run.py $(RELIABILITY_ARGS)

# Both linters always run (a ruff finding does not hide a Dockerfile one); either fails the target.
lint: install
	@status=0; \
	$(VENV)/bin/ruff check . || status=1; \
	$(VENV)/bin/hadolint Dockerfile || status=1; \
	exit $$status

clean:
	rm -rf $(VENV) $(TOOLS_VENV) .pytest_cache
