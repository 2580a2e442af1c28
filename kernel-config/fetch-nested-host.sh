#!/usr/bin/env bash
# Fetches the "nested host" kernel: Debian's stock amd64 kernel with its KVM
# modules, used by husk-vmm's boot test on hosts without hardware
# virtualization. The test boots this kernel in QEMU TCG with an emulated AMD
# CPU that has SVM; kvm_amd then gives that emulated machine a /dev/kvm that
# can run a stock Linux guest, and husk-vmm boots husk's guest on it.
#
#   kernel-config/fetch-nested-host.sh OUT_DIR   -> OUT_DIR/nested-host (symlink into the cache)
#
# Cache: $HUSK_CACHE/nested-host/<package version>-<module list hash>/ {vmlinuz,
# modules/*.ko, modules.order}; nothing is fetched when it is there. The package is only
# downloaded and unpacked, never installed.
set -euo pipefail

out=${1:?usage: fetch-nested-host.sh OUT_DIR}
cache=${HUSK_CACHE:-/var/cache/husk}
meta=linux-image-amd64
# Load order: each module's dependencies come before it (checked below). tun: the
# pod NIC test's tap.
modules=(irqbypass kvm ccp kvm-amd tun)

if ! version=$(apt-cache policy "$meta" 2>/dev/null | awk '/Candidate:/ {print $2}') \
    || [ -z "$version" ] || [ "$version" = "(none)" ]; then
  echo "fetch-nested-host.sh: apt knows no $meta; run apt-get update" >&2
  exit 1
fi
dest="$cache/nested-host/$version-$(echo "${modules[*]}" | sha256sum | cut -c1-8)"
mkdir -p "$out"

if [ ! -s "$dest/modules.order" ]; then
  pkg=$(apt-cache depends "$meta" | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  if [ -z "$pkg" ]; then
    echo "fetch-nested-host.sh: $meta $version names no linux-image package" >&2
    exit 1
  fi
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  echo "fetch-nested-host.sh: downloading $pkg ($meta $version)" >&2
  (cd "$work" && apt-get download -q "$pkg" >/dev/null 2>&1) || {
    apt-get update -q >/dev/null
    (cd "$work" && apt-get download -q "$pkg" >/dev/null)
  }
  dpkg-deb -x "$work"/"$pkg"_*.deb "$work/root"
  kver=${pkg#linux-image-}
  tmp="$dest.tmp"
  rm -rf "$tmp"
  mkdir -p "$tmp/modules"
  cp "$work/root/boot/vmlinuz-$kver" "$tmp/vmlinuz"
  loaded=()
  for m in "${modules[@]}"; do
    ko=$(find "$work/root/lib/modules/$kver" -name "$m.ko" -print -quit)
    if [ -z "$ko" ]; then
      echo "fetch-nested-host.sh: $pkg has no $m.ko" >&2
      exit 1
    fi
    deps=$(/sbin/modinfo -F depends "$ko")
    for d in ${deps//,/ }; do
      if [[ ! " ${loaded[*]} " == *" $d "* ]]; then
        echo "fetch-nested-host.sh: $m needs $d, which is not loaded before it; fix modules=()" >&2
        exit 1
      fi
    done
    cp "$ko" "$tmp/modules/"
    loaded+=("$m")
  done
  printf '%s\n' "${modules[@]}" > "$tmp/modules.order"
  echo "$kver" > "$tmp/kernel-release"
  rm -rf "$dest"
  mv "$tmp" "$dest"
fi
ln -sfn "$dest" "$out/nested-host"
echo "fetch-nested-host.sh: $out/nested-host -> $dest ($(cat "$dest/kernel-release"))"
