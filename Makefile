# fssd: everything from a fresh Debian 12 machine where you are root.
#   make test    system packages + .venv, then the whole suite
#   make demo    the main job end to end
#   make bench   benchmarks against nbdkit and qemu-storage-daemon
#   make stress  fault injection: SIGKILLs of every process kind under a write storm, then
#                resource floods on every socket (SEED=, ROUNDS=: both loops)

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
APT_PACKAGES := libnbd-bin nbdfuse qemu-utils fuse3 e2fsprogs xfsprogs util-linux kmod procps systemd udev nbd-client fio mandoc python3-venv openssl
BENCH_PACKAGES := nbdkit fio qemu-system-common
DEMO_PACKAGES := nbdkit
STAMP_APT := $(VENV)/.apt-stamp
STAMP_VENV := $(VENV)/.venv-stamp

SEED ?= 1
ROUNDS ?= 60

.PHONY: all deps venv test demo bench stress clean
all: test

$(STAMP_APT):
	@mkdir -p $(VENV)
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

$(STAMP_VENV): pyproject.toml
	@[ -x $(VPY) ] || $(PYTHON) -m venv $(VENV)
	@$(VPY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	@# compat: a plain path entry (.pth); the default editable finder costs every Python
	@# start (each worker, each fssconfig) ~15 ms. Setuptools calls that mode transitional:
	@# if it is gone, the default install still works.
	$(VPY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat 2>/dev/null || $(VPY) -m pip install -q -e '.[test]'
	@# Byte code compiled once, as an installed fssd has it (PYTHONDONTWRITEBYTECODE would
	@# otherwise make every process start compile every module).
	@$(VPY) -m compileall -q daemon workers ipc examples >/dev/null
	@touch $@

deps: $(STAMP_APT)
venv: $(STAMP_VENV)

test: deps venv
	$(VPY) -m pytest -q

demo: deps venv
	@missing=""; for p in $(DEMO_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
	$(VPY) -m examples.demo

bench: deps venv
	@missing=""; for p in $(BENCH_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
	bash bench/run.sh

stress: deps venv
	$(VPY) tests/stress.py --seed $(SEED) --rounds $(ROUNDS)
	$(VPY) tests/stress_limits.py --seed $(SEED) --rounds $(ROUNDS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

include etc/install.mk
