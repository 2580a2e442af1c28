#!/usr/bin/env bash
# Installs the Debian packages husk builds and tests with (with --test, also
# containerd 2.3 and cargo-fuzz, which only the tests use). Idempotent: asks
# apt only for what is missing. Needs root.
set -euo pipefail

pkgs=(
  # guest kernel build (kernel-config/build.sh)
  linux-source-6.1 flex bison bc libelf-dev libssl-dev cpio xz-utils make gcc
  # running pod VMs where husk-vmm cannot run them itself
  qemu-system-x86
  # the emulated SVM test host: modinfo orders its KVM modules (fetch-nested-host.sh)
  kmod
  # pod networking: ip and tc in the pod's namespace; CNI portmap's iptables
  iproute2 iptables
  # the agent's static link with seccomp (containers issue) and protobuf clients
  libseccomp-dev protobuf-compiler
  # test images and tools
  busybox-static procps
  # containerd and its runc runtime: the shim tests and the runc baseline
  containerd runc containernetworking-plugins
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# containerd 2.3 (what current Kubernetes needs) beside Debian's 1.6: the
# containerd tests run on both. Its binaries come from the project's shared
# tools (checksummed), into $CONTAINERD_2_3_PREFIX.
install_containerd_2_3() {
  local tools=${CONTAINERD_2_3_TOOLS:-../shared/tools/containerd-2.3}
  local prefix=${CONTAINERD_2_3_PREFIX:-/opt/containerd-2.3}
  if [ -x "$prefix/bin/containerd" ]; then
    return 0
  fi
  if [ ! -x "$tools/install.sh" ]; then
    echo "install-deps: $tools/install.sh not found: containerd 2.3 not installed (its tests will skip, or fail under CI)" >&2
    return 0
  fi
  echo "install-deps: containerd 2.3 into $prefix"
  "$tools/install.sh" "$prefix"
}

# cargo-fuzz for the fuzz targets (fuzz/; make test runs each briefly), into
# its own prefix: a machine's ~/.cargo/bin may be read-only.
install_cargo_fuzz() {
  local prefix=${CARGO_FUZZ_PREFIX:-/opt/cargo-fuzz}
  if [ -x "$prefix/bin/cargo-fuzz" ] || command -v cargo-fuzz >/dev/null 2>&1; then
    return 0
  fi
  echo "install-deps: cargo-fuzz into $prefix"
  cargo install --locked --quiet --root "$prefix" cargo-fuzz@0.13.2
}

# --test: also what only the tests use (containerd 2.3, cargo-fuzz): `make test`
# asks for it, `make demo` does not.
test_extras() {
  if [ "${1:-}" = --test ]; then
    install_containerd_2_3
    install_cargo_fuzz
  fi
}

if ((${#missing[@]} == 0)); then
  echo "install-deps: all packages present"
  test_extras "${1:-}"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-deps: missing ${missing[*]}; run as root (or: sudo make setup)" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
test_extras "${1:-}"
