#!/usr/bin/env bash
# Installs the Debian packages husk builds and tests with. Idempotent: asks apt
# only for what is missing. Needs root.
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
if ((${#missing[@]} == 0)); then
  echo "install-deps: all packages present"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-deps: missing ${missing[*]}; run as root (or: sudo make setup)" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
