# vmvault developer entry points.
#   make run         install what is missing, then start the service: vmvault serve (examples/serve.sh)
#   make quickstart  install what is missing, then run the quickstart (examples/quickstart.sh)
#   make test   install what is missing, then lint, type-check and run the whole test suite
# Works as root on a fresh Debian 12 machine; reruns skip what is already installed.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

VENV  := .venv
STAMP := $(VENV)/.vmvault-deps.stamp

# Debian packages vmvault and its tests need (qemu-system-x86: a real QEMU for the
# "image in use by a running VM" tests, and it ships qemu-storage-daemon; ntfs-3g and fusefat:
# file recovery's user-space NTFS/FAT drivers; xfsprogs, dosfstools, mtools: its test images;
# debootstrap: the PostgreSQL test guest of tests/vm/pgguest.py).
APT_PACKAGES := qemu-utils qemu-system-x86 libnbd-bin python3-libnbd python3-venv gdisk e2fsprogs \
                fuse3 nbdkit restic borgbackup zstd \
                xfsprogs ntfs-3g dosfstools mtools fusefat \
                libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients python3-libvirt \
                chromium debootstrap

.PHONY: deps apt run quickstart test lint typecheck pytest clean

deps: apt $(STAMP)

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

run: deps
	bash examples/serve.sh

quickstart: deps
	bash examples/quickstart.sh

lint: deps
	$(VENV)/bin/ruff check $(wildcard src tests bench)

typecheck: deps
	$(VENV)/bin/mypy

pytest: deps
	$(VENV)/bin/pytest -q

test: deps
	$(VENV)/bin/ruff check $(wildcard src tests bench)
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
