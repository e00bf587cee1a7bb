# chainbench set-up, main job and tests.  Every target is idempotent and installs what it needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CB := $(VENV)/bin/chainbench
export CHAINBENCH_CACHE ?= /var/cache/chainbench

APT_PACKAGES := python3 python3-venv python3-dev gcc libc6-dev make git file \
	containerd runc qemu-system-x86 busybox-static linux-source-6.1 \
	flex bison libelf-dev libssl-dev bc cpio xz-utils util-linux iproute2 procps
# Debian's stock kernel: the guest-kernel fallback (and its test).  Without recommends: those
# pull in firmware and apparmor, which a guest kernel does not need.
APT_NORECOMMENDS := linux-image-amd64

.PHONY: setup apt venv assets jit kernel vm run test protos calibration validation

setup: apt venv assets vm jit

apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	@missing=$$(for p in $(APT_NORECOMMENDS); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing (no recommends): $$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

assets: venv
	$(PY) -m bench.runtimes.assets

# The simulator's compiled event loop: ~10 s to compile once, cached by numba next to its source.
jit: venv
	$(PY) -m sim.fast

# Guest kernel (tinyconfig 6.1, cached by config hash: minutes once, free afterwards) and the
# initramfs with the Python guest agent.
kernel: venv
	$(PY) -m bench.vm.kernel

vm: kernel
	$(PY) -m bench.vm.initramfs

# The main job: bench + simulate the default scenario and write a report.
run: setup
	$(CB) run

test: setup
	$(PY) -m pytest -q

# The simulator's validation on this machine: SESSIONS interleaved sessions each of runc-seq
# (calibrate) and runc-c10 (held out), pooled; exits 1 when an error is above 10%.
SESSIONS ?= 5

# Regenerate the shipped simulator calibration from fresh bench runs on this machine:
# SESSIONS sessions of runc-seq, fitted together (one session drifts too much to stand alone).
calibration: setup
	rm -rf results/calibration-bench
	for i in $$(seq $(SESSIONS)); do \
		$(CB) bench runc-seq --chain shim,sandbox --out results/calibration-bench/seq-$$i \
		|| exit 1; \
	done
	$(CB) calibrate results/calibration-bench --out scenarios/calibration-runc.json
validation: setup
	rm -rf results/validation
	for i in $$(seq $(SESSIONS)); do \
		$(CB) bench runc-seq --chain shim,sandbox --out results/validation/seq-$$i && \
		$(CB) bench runc-c10 --chain shim,sandbox --out results/validation/c10-$$i || exit 1; \
	done
	$(CB) validate --calibrate-on results/validation/seq-* --validate-on results/validation/c10-* \
		--plot results/validation/validation.png

protos: venv
	$(CB) protogen
