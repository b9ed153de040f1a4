# Fresh-machine entry points (README top): `make serve` and `make test`.
# Each creates .venv, installs the project (torch pinned to the CPU wheel) and the Debian
# packages it needs (fortunes: demo training text; prometheus: monitoring tests).

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
APT_PACKAGES ?= fortunes prometheus
PORT ?= 8080
PYTEST_ARGS ?=

.PHONY: install system-deps serve demo test test-fast reliability lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# text-generation pins huggingface_hub<1 (transformers 5 needs >=1); its client code runs on
	# either, so it goes in without its pins, next to the aiohttp/pydantic the dev extra brings.
	$(PIP) install -q --no-deps 'text-generation>=0.7'
	touch $@

install: $(VENV)/.installed

system-deps:
	@missing=""; \
	[ -d /usr/share/games/fortunes ] || missing="$$missing fortunes"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

demo: install system-deps
	$(PY) -m camex_runtime.training.demo

serve: install system-deps
	$(VENV)/bin/camex-server --host 127.0.0.1 --port $(PORT)

test: install system-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not e2e and not slow" $(PYTEST_ARGS)

# The long reliability runs (~25 min on 2 cores; results JSON + table): benchmarks/reliability.
# Their quick versions run with the tests (pytest -m reliability).
reliability: install system-deps
	$(PY) benchmarks/reliability/run.py $(RELIABILITY_ARGS)

lint: install
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf $(VENV) .pytest_cache
