#!/usr/bin/env bash
# make demo: a busybox container through a private containerd, in a husk
# microVM. Expects `make setup guest build` (the Makefile runs them first).
#
# containerd gets its own config, root, state and sockets under $HUSK_DEMO_DIR
# (default /var/tmp/husk-demo), finds containerd-shim-husk-v2 on its PATH
# (target/debug first), and is stopped again at the end. The shim finds the
# guest kernel, initrd and husk-vmm next to itself (target/guest, target/debug)
# without any configuration file.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
demo=${HUSK_DEMO_DIR:-/var/tmp/husk-demo}
bin=$root/target/debug
image=docker.io/library/busybox:husk
ns=husk-demo

if [ "$(id -u)" != 0 ]; then
  echo "demo: containerd needs root (sudo make demo)" >&2
  exit 1
fi
for f in "$bin/containerd-shim-husk-v2" "$bin/husk-vmm" "$bin/husk-busybox-image" \
         "$root/target/guest/vmlinux" "$root/target/guest/initrd.img"; do
  [ -e "$f" ] || { echo "demo: $f is missing (make guest build)" >&2; exit 1; }
done

mkdir -p "$demo"
sock=$demo/containerd.sock
cat > "$demo/config.toml" <<TOML
version = 2
root = "$demo/root"
state = "$demo/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
TOML

PATH=$bin:$PATH containerd --config "$demo/config.toml" >"$demo/containerd.log" 2>&1 &
containerd_pid=$!
stop() {
  ctr --address "$sock" -n $ns task rm -f demo >/dev/null 2>&1 || true
  ctr --address "$sock" -n $ns containers rm demo >/dev/null 2>&1 || true
  kill "$containerd_pid" 2>/dev/null || true
  wait "$containerd_pid" 2>/dev/null || true
}
trap stop EXIT
for _ in $(seq 100); do
  ctr --address "$sock" version >/dev/null 2>&1 && break
  sleep 0.1
done
ctr() { command ctr --address "$sock" -n $ns "$@"; }

"$bin/husk-busybox-image" "$demo/busybox.tar" >/dev/null
ctr images import "$demo/busybox.tar" >/dev/null

echo "host kernel:  $(uname -r)"
echo "+ ctr run --rm --runtime io.containerd.husk.v2 $image demo uname -a"
start=$(date +%s%N)
ctr run --rm --runtime io.containerd.husk.v2 "$image" demo uname -a
end=$(date +%s%N)
echo "(the container ran in a husk microVM: guest kernel above; $(( (end - start) / 1000000 )) ms)"
