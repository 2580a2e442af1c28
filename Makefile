# husk: the developer entry points. See README.md.
#   make setup   install the host packages husk needs (root; Debian 12)
#   make guest   guest kernel (cached outside the checkout) + agent initrd -> target/guest/
#   make build   host binaries (husk-vmm, containerd-shim-husk-v2)
#   make test    everything above, then every unit and end-to-end test
#   make bench   `name: value unit` lines: pod VM start-up and memory, containers
#                in a VM (create, exec, virtio-fs) vs runc and the host, husk-vmm
#                start-up, then bench-shim: ctr run --rm echo, husk vs runc,
#                and bench-cri: CRI pods (ready, first output, memory) vs runc
#   make lint    rustfmt and clippy, as CI runs them
#   make demo    setup, guest, build, then a busybox container through a private
#                containerd in a husk microVM, printing the guest kernel

SHELL := /bin/bash
CARGO ?= cargo
GUEST_DIR := $(CURDIR)/target/guest
AGENT_TARGET := x86_64-unknown-linux-gnu
AGENT_BIN := target/$(AGENT_TARGET)/release/husk-agent

.PHONY: fuzz test-deps nested-host all setup guest kernel agent initrd build test bench bench-shim bench-cri bench-net lint demo install clean-guest

all: guest build

setup:
	bash scripts/install-deps.sh

# What only the tests use besides: containerd 2.3, cargo-fuzz.
test-deps:
	bash scripts/install-deps.sh --test

kernel:
	bash kernel-config/build.sh $(GUEST_DIR)

# The agent is /init in an initrd with no libc: link it (and libseccomp) statically.
agent:
	LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
	  RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release -p husk-agent --target $(AGENT_TARGET)

initrd: agent
	mkdir -p $(GUEST_DIR)
	strip -o $(GUEST_DIR)/husk-agent $(AGENT_BIN)
	$(CARGO) run --release -q -p husk-images --bin husk-mkinitrd -- --agent $(GUEST_DIR)/husk-agent --out $(GUEST_DIR)/initrd.img

# Debian's stock kernel and its KVM modules: the emulated SVM host in which husk-vmm's
# boot test runs where the real /dev/kvm cannot run Linux (vmm/tests/nested_svm).
nested-host:
	bash kernel-config/fetch-nested-host.sh $(GUEST_DIR)

guest: kernel initrd

build:
	$(CARGO) build -p husk-vmm -p husk-shim
	$(CARGO) build -p husk-tests --bin husk-busybox-image

demo: setup guest build
	bash scripts/demo.sh

# The shim, husk-vmm and the guest where containerd and the shim's defaults
# find them (PREFIX/bin on containerd's PATH; PREFIX/share/husk).
PREFIX ?= /usr/local
install:
	$(CARGO) build --release -p husk-vmm -p husk-shim
	install -D -m 0755 target/release/containerd-shim-husk-v2 $(PREFIX)/bin/containerd-shim-husk-v2
	install -D -m 0755 target/release/husk-vmm $(PREFIX)/bin/husk-vmm
	install -D -m 0644 $(GUEST_DIR)/vmlinux $(PREFIX)/share/husk/vmlinux
	install -D -m 0644 $(GUEST_DIR)/initrd.img $(PREFIX)/share/husk/initrd.img

# Two test threads: each end-to-end test boots a VM, and TCG on two cores
# slows to a crawl with more at once.
# Every skip, and every retry of the emulated host's own faults, is recorded (testing/skip)
# and counted in the closing line; under CI=true
# (or HUSK_REQUIRE=all) a test missing what CI provides fails instead of skipping.
# The tests that drive a real containerd run twice: on Debian's 1.6 (PATH), then on
# containerd 2.3 (make test-deps installs it from ../shared/tools/containerd-2.3).
CONTAINERD_2_3 ?= /opt/containerd-2.3/bin
CONTAINERD_TESTS := shim_run shim_tasks shim_pod shim_concurrency cri_pod cri_net hostile_guest containerd_runc
SKIP_LOG := $(CURDIR)/target/skipped.log
RETRY_LOG := $(CURDIR)/target/retried.log
test: test-deps guest nested-host build
	rm -f $(SKIP_LOG) $(RETRY_LOG)
	export HUSK_SKIP_LOG=$(SKIP_LOG) HUSK_RETRY_LOG=$(RETRY_LOG) HUSK_GUEST_DIR=$(GUEST_DIR) HUSK_VMM_BIN=$(CURDIR)/target/debug/husk-vmm; \
	  $(CARGO) test --workspace --no-fail-fast -- --test-threads=2; rc=$$?; \
	  CARGO="$(CARGO)" bash scripts/test-on-containerd.sh $(CONTAINERD_2_3) $(CONTAINERD_TESTS) || rc=1; \
	  PATH="$(CARGO_FUZZ_BIN):$$PATH" bash scripts/fuzz-smoke.sh $(FUZZ_SMOKE_SECONDS) || rc=1; \
	  bash scripts/skip-summary.sh $(SKIP_LOG) $(RETRY_LOG); exit $$rc

# Fuzzing husk-vmm's guest-facing parsers (fuzz/: cargo-fuzz, libFuzzer, AddressSanitizer on
# nightly): every target FUZZ_SECONDS each, one after another; `make test` ends with a
# FUZZ_SMOKE_SECONDS run of each.
FUZZ_SECONDS ?= 300
FUZZ_SMOKE_SECONDS ?= 10
CARGO_FUZZ_BIN ?= /opt/cargo-fuzz/bin
fuzz:
	PATH="$(CARGO_FUZZ_BIN):$$PATH" bash fuzz/run.sh $(FUZZ_SECONDS)

bench: guest
	$(CARGO) build --release -p husk-vmm
	$(CARGO) build --release -p husk-tests --bin husk-bench
	HUSK_GUEST_DIR=$(GUEST_DIR) HUSK_VMM_BIN=$(CURDIR)/target/release/husk-vmm target/release/husk-bench
	$(CARGO) build --release -p husk-tests --bin husk-container-bench
	HUSK_GUEST_DIR=$(GUEST_DIR) HUSK_VMM_BIN=$(CURDIR)/target/release/husk-vmm target/release/husk-container-bench
	$(CARGO) build --release -p husk-vmm --bin husk-vmm-bench
	target/release/husk-vmm-bench
	$(MAKE) bench-shim
	$(MAKE) bench-cri
	$(MAKE) bench-net

# ctr run --rm echo through containerd: husk vs runc, and the split of husk's time.
bench-shim: guest build
	$(CARGO) build -p husk-tests --bin husk-shim-bench
	HUSK_GUEST_DIR=$(GUEST_DIR) HUSK_VMM_BIN=$(CURDIR)/target/debug/husk-vmm target/debug/husk-shim-bench

# Pods through containerd's CRI plugin, husk vs runc: RunPodSandbox to ready,
# to the first container output, and host memory per idle pod.
bench-cri: guest build
	$(CARGO) build -p husk-tests --bin husk-cri-bench
	HUSK_GUEST_DIR=$(GUEST_DIR) HUSK_VMM_BIN=$(CURDIR)/target/debug/husk-vmm target/debug/husk-cri-bench

# TCP throughput between two pods by pod IP, two husk pods vs two runc pods.
bench-net: guest build
	$(CARGO) build -p husk-tests --bin husk-net-bench
	HUSK_GUEST_DIR=$(GUEST_DIR) HUSK_VMM_BIN=$(CURDIR)/target/debug/husk-vmm target/debug/husk-net-bench

lint:
	$(CARGO) fmt --all -- --check
	cd fuzz && $(CARGO) fmt -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean-guest:
	rm -rf $(GUEST_DIR)
