#!/usr/bin/env bash
# Builds husk's guest kernel (vmlinux, ELF with a PVH entry) from Debian's
# linux-source-6.1 and husk.config, caching the result outside the checkout.
#
#   kernel-config/build.sh OUT_DIR        -> OUT_DIR/vmlinux (symlink into the cache)
#
# The cache key is the source package version plus the hash of husk.config and
# this script, so a config change rebuilds and an unchanged one costs nothing.
# HUSK_CACHE overrides the cache root (default /var/cache/husk).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUT_DIR}
cache=${HUSK_CACHE:-/var/cache/husk}
pkg=linux-source-6.1
deps=(flex bison bc libelf-dev libssl-dev cpio xz-utils make gcc "$pkg")

missing=()
for d in "${deps[@]}"; do
  dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q 'install ok installed' || missing+=("$d")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "kernel-config/build.sh: missing packages ${missing[*]} (run as root to install them)" >&2
    exit 1
  fi
  echo "kernel-config/build.sh: installing ${missing[*]}" >&2
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

version=$(dpkg-query -W -f='${Version}' "$pkg")
key=$( { echo "$version"; cat "$here/husk.config" "$here/build.sh"; } | sha256sum | cut -c1-16)
dest="$cache/kernel/$key"
mkdir -p "$out"

if [ ! -s "$dest/vmlinux" ]; then
  src="$cache/src/$pkg-$version"
  if [ ! -f "$src/Makefile" ]; then
    echo "kernel-config/build.sh: unpacking $pkg $version" >&2
    rm -rf "$src.tmp" && mkdir -p "$src.tmp"
    tar -xJf "/usr/src/$pkg.tar.xz" -C "$src.tmp" --strip-components=1
    rm -rf "$src" && mv "$src.tmp" "$src"
  fi
  build="$cache/build/$key"
  mkdir -p "$build"
  echo "kernel-config/build.sh: building vmlinux ($pkg $version, config $key)" >&2
  start=$(date +%s.%N)
  make -C "$src" O="$build" ARCH=x86_64 KCONFIG_ALLCONFIG="$here/husk.config" allnoconfig >/dev/null
  # Every option husk asks for must survive dependency resolution: a silently
  # dropped option shows up much later as a missing guest feature.
  bad=0
  while IFS= read -r line; do
    case "$line" in CONFIG_*=*) ;; *) continue ;; esac
    grep -qxF "$line" "$build/.config" || { echo "  not applied: $line" >&2; bad=1; }
  done <"$here/husk.config"
  if [ "$bad" = 1 ]; then
    echo "kernel-config/build.sh: husk.config has options that Kconfig rejected (missing dependency?)" >&2
    exit 1
  fi
  make -C "$src" O="$build" ARCH=x86_64 -j"$(nproc)" vmlinux >"$build/build.log" 2>&1 || {
    tail -40 "$build/build.log" >&2
    echo "kernel-config/build.sh: kernel build failed, full log in $build/build.log" >&2
    exit 1
  }
  end=$(date +%s.%N)
  mkdir -p "$dest.tmp"
  cp "$build/vmlinux" "$build/.config" "$dest.tmp/"
  strip --strip-debug "$dest.tmp/vmlinux" 2>/dev/null || true
  echo "$end - $start" | bc >"$dest.tmp/build-seconds"
  echo "$version" >"$dest.tmp/source-version"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  # Object files are only worth keeping for the key being built now.
  find "$cache/build" -mindepth 1 -maxdepth 1 ! -name "$key" -exec rm -rf {} + 2>/dev/null || true
fi

ln -sfn "$dest/vmlinux" "$out/vmlinux"
ln -sfn "$dest/build-seconds" "$out/kernel-build-seconds"
ln -sfn "$dest/.config" "$out/kernel.config"
echo "kernel-config/build.sh: $out/vmlinux -> $dest/vmlinux" >&2
