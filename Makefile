# vmvault developer entry points.
#   make run         install what is missing, then start the service: vmvault serve (examples/serve.sh)
#   make quickstart  install what is missing, then run the quickstart (examples/quickstart.sh)
#   make test   install what is missing (and the test tools), then lint, type-check and run the whole suite
#   make bench-deps  what bench/ needs (the same as make test); see docs/performance.md
# Works as root on a fresh Debian 12 machine; reruns skip what is already installed.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

VENV  := .venv
STAMP := $(VENV)/.vmvault-deps.stamp

# Debian packages the vmvault service needs (make run): QEMU and its tools (qemu-img, qemu-nbd,
# qemu-storage-daemon), libnbd, FUSE and nbdkit for file recovery, its user-space NTFS/FAT drivers,
# the libvirt client and Python binding (for libvirt-managed VMs), Debian's Python venv.
APT_PACKAGES := qemu-utils qemu-system-x86 libnbd-bin python3-libnbd python3-venv e2fsprogs \
                fuse3 nbdkit ntfs-3g fusefat libvirt-clients python3-libvirt

# Only for the tests and the benchmark (make test): gdisk for tools/diskgen.py, file systems for the
# file-recovery test images, a libvirt daemon to manage test domains, chromium for the portal's
# browser tests (driven by Playwright from requirements-dev.lock), restic and borg for bench/,
# prometheus (promtool) and systemd (systemd-analyze) for tests/test_deploy.py's checks of deploy/,
# debootstrap for the PostgreSQL test guest (tests/vm/pgguest.py), postgresql (15) for the PostgreSQL
# catalog tests (tests/pgserver.py runs its own initdb; the product only needs psycopg from requirements.lock),
# Azurite (the Azure Blob emulator of tests/objstores.py) is installed from npm under .venv/node;
# moto, the S3 server, is in requirements-dev.lock.
TEST_APT_PACKAGES := gdisk xfsprogs dosfstools mtools zstd libvirt-daemon libvirt-daemon-driver-qemu chromium \
                     restic borgbackup prometheus systemd debootstrap postgresql
# Node.js and npm for Azurite, from Debian only when no `npm` is on the PATH: a host that has
# Node.js from elsewhere (NodeSource's nodejs bundles npm and conflicts with Debian's npm) keeps it.
NODE_APT_PACKAGES := nodejs npm
AZURITE_VERSION := 3.37.0

# The suite runs two tests at a time (pytest-xdist; docs/testing.md, "Two at a time"): most scenario tests
# wait on one process (a TCG guest, a server), so one test at a time leaves a core idle. Override with
# `make test PYTEST_WORKERS=1` (or 0: one process, no workers) or `PYTEST_WORKERS=4`.
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(PYTEST_WORKERS) --dist loadgroup

.PHONY: deps test-deps bench-deps apt run quickstart test lint typecheck pytest clean

DEV_STAMP := $(VENV)/.vmvault-dev-deps.stamp

deps: apt $(STAMP)

test-deps: deps
	@$(MAKE) --no-print-directory apt APT_PACKAGES="$(TEST_APT_PACKAGES)"
	@command -v npm >/dev/null 2>&1 || $(MAKE) --no-print-directory apt APT_PACKAGES="$(NODE_APT_PACKAGES)"
	@$(MAKE) --no-print-directory $(DEV_STAMP)

bench-deps: test-deps

# `make -s print-APT_PACKAGES`: a variable's value (tests/test_standalone.py checks the split).
print-%:
	@echo $($*)

apt:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' "$$p" 2>/dev/null | grep -q '^install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "==> installing Debian packages:$$missing"; \
	  apt-get update -q; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(VENV)/bin/python: | apt
	/usr/bin/python3 -m venv --system-site-packages $(VENV)

$(STAMP): requirements.lock pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

$(DEV_STAMP): requirements-dev.lock requirements.lock Makefile | $(STAMP)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.lock
	npm install -q --prefix $(VENV)/node --no-audit --no-fund azurite@$(AZURITE_VERSION)
	touch $@

run: deps
	bash examples/serve.sh

quickstart: deps
	bash examples/quickstart.sh

lint: test-deps
	$(VENV)/bin/ruff check $(wildcard src tests bench tools)

typecheck: test-deps
	$(VENV)/bin/mypy

pytest: test-deps
	$(VENV)/bin/pytest -q $(PYTEST_PARALLEL)

test: test-deps
	$(VENV)/bin/ruff check $(wildcard src tests bench tools)
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q $(PYTEST_PARALLEL) --durations=25

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
