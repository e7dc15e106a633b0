# passivisor: the two public commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUF := node_modules/.bin/buf
BACKEND ?= qemu
# Debian packages later stages need: QEMU and its tools, nbdkit for encrypted
# volumes, strace for the passivity check, busybox-static for the tiny guest.
DEBIAN_PACKAGES := qemu-system-x86 qemu-utils nbdkit strace busybox-static cpio
# The unprivileged system user QEMU runs as (claim C15).
QEMU_USER := passivisor-qemu

.PHONY: deps debian test lint typecheck demo fuzz fuzz-long faults-long bench docs clean

deps: debian $(STAMP) $(BUF)

debian:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make: missing Debian packages:$$missing (run as root to install them)"; exit 1; fi; \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
# QEMU runs as this system user, never as root (claim C15; [qemu] user in agent.toml). It owns no
# file and has no home or shell: the agent gives it only what one VM needs, through its group.
	@if [ "$$(id -u)" = 0 ] && ! id -u $(QEMU_USER) >/dev/null 2>&1; then \
	  echo "creating system user $(QEMU_USER): useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin $(QEMU_USER)"; \
	  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin $(QEMU_USER); \
	elif ! id -u $(QEMU_USER) >/dev/null 2>&1; then \
	  echo "make: no system user $(QEMU_USER): QEMU will run as the agent's user (run as root to create it)"; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,fuzz,dev]'
	touch $@

# buf (npm @bufbuild/buf, pinned in package-lock.json) lints the gRPC contract in proto/.
# --ignore-scripts: the package's postinstall only swaps its JS launcher for the binary.
$(BUF): package.json package-lock.json
	@command -v npm >/dev/null || { echo "make: npm is missing (Debian: apt-get install nodejs npm)"; exit 1; }
	npm ci --no-audit --no-fund --ignore-scripts
	touch $@

lint: $(STAMP) $(BUF)
	$(PY) -m ruff check .
	$(BUF) lint proto
	$(PY) -m controller.api.generate --check

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

# The long campaign (docs/reliability.md, "Long campaigns"): every fuzz target for FUZZ_LONG_SECONDS each,
# then every test file that uses hypothesis under the long profile (20x the examples, tests/conftest.py).
# Both parts run even if the first finds something; the status is non-zero if either did.  The pytest
# timeout is raised from 300 s: a property test with 1000 examples may legitimately take longer.
FUZZ_LONG_SECONDS ?= 600
PROPERTY_TESTS = $(shell grep -rlE --include='test_*.py' '^(from|import) hypothesis' tests | sort)

fuzz-long: deps
	@status=0; \
	$(PY) -m fuzz --seconds $(FUZZ_LONG_SECONDS) || status=1; \
	HYPOTHESIS_PROFILE=long $(PY) -m pytest -q --timeout=3600 --durations=20 $(PROPERTY_TESTS) || status=1; \
	exit $$status

# Every hit of every kill point of tests/faults/points.py over the long sequences (docs/reliability.md, §1).
faults-long: deps
	PASSIVISOR_FAULTS=long $(PY) -m pytest tests/faults -k every_kill_point -q -s

bench: deps
	$(PY) -m bench

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache .coverage .hypothesis fuzz/artifacts
