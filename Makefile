# passivisor: the two public commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BACKEND ?= qemu
# Debian packages later stages need: QEMU and its tools, nbdkit for encrypted
# volumes, strace for the passivity check, busybox-static for the tiny guest.
DEBIAN_PACKAGES := qemu-system-x86 qemu-utils nbdkit strace busybox-static cpio

.PHONY: deps debian test lint typecheck demo fuzz fuzz-long bench docs clean

deps: debian $(STAMP)

debian:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make: missing Debian packages:$$missing (run as root to install them)"; exit 1; fi; \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,fuzz,dev]'
	touch $@

lint: $(STAMP)
	$(PY) -m ruff check .

typecheck: $(STAMP)
	$(PY) -m mypy

docs: $(STAMP)
	$(PY) -m hostagent.wire.docgen > docs/wire-format.md

test: deps lint typecheck
	$(PY) -m pytest --cov=hostagent --cov=controller --cov-report= -q
	$(PY) -m coverage report --include='hostagent/wire/*' --show-missing --fail-under=100

demo: deps
	$(PY) -m controller.devhost.demo --backend $(BACKEND)

fuzz: deps
	$(PY) -m fuzz --seconds 60

bench: deps
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .hypothesis fuzz/artifacts
