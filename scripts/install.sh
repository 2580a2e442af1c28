#!/usr/bin/env bash
# Installs husk on a Kubernetes (or plain containerd) node: the shim and
# husk-vmm, the guest kernel and initrd, /etc/husk/configuration.toml, and the
# `husk` runtime handler in containerd's config: deploy/containerd-husk-v3.toml
# into a version 3 config (containerd 2.x), deploy/containerd-husk.toml into a
# version 2 one (1.6/1.7). Without a config, the installed containerd's version
# decides (2.x: version 3), or --config-version.
#
#   scripts/install.sh [--prefix /usr/local] [--bin-dir DIR] [--guest-dir DIR]
#                      [--containerd-config /etc/containerd/config.toml]
#                      [--config-version 2|3] [--root DIR] [--force] [--no-containerd]
#
# Idempotent: a second run with the same inputs changes nothing. It never
# overwrites a configuration it did not write without --force: an existing
# /etc/husk/configuration.toml that differs, or a `husk` runtime in
# containerd's config outside husk's own marked block, stops it with an
# error. --root installs below another root (images, tests). Restart
# containerd afterwards for the handler to take effect.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
prefix=/usr/local
bin_dir=""
guest_dir="$here/target/guest"
containerd_config=/etc/containerd/config.toml
root=""
force=0
register=1
config_version=""

die() { echo "install: $*" >&2; exit 1; }

while (($#)); do
  case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --guest-dir) guest_dir="$2"; shift 2 ;;
    --containerd-config) containerd_config="$2"; shift 2 ;;
    --root) root="${2%/}"; shift 2 ;;
    --force) force=1; shift ;;
    --no-containerd) register=0; shift ;;
    --config-version) config_version="$2"; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

case "$config_version" in
  ""|2|3) ;;
  *) die "--config-version $config_version: must be 2 (containerd 1.6/1.7) or 3 (containerd 2.x)" ;;
esac
if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
  die "run as root (or with --root DIR)"
fi
if [ -z "$bin_dir" ]; then
  # Prefer a release build; `make build` makes a debug one.
  for d in "$here/target/release" "$here/target/debug"; do
    if [ -x "$d/containerd-shim-husk-v2" ] && [ -x "$d/husk-vmm" ]; then bin_dir="$d"; break; fi
  done
  [ -n "$bin_dir" ] || die "no containerd-shim-husk-v2 + husk-vmm under target/ (make build, or --bin-dir)"
fi
for f in "$bin_dir/containerd-shim-husk-v2" "$bin_dir/husk-vmm"; do
  [ -x "$f" ] || die "$f is missing (make build, or --bin-dir)"
done
for f in "$guest_dir/vmlinux" "$guest_dir/initrd.img"; do
  [ -f "$f" ] || die "$f is missing (make guest, or --guest-dir)"
done

share="$prefix/share/husk"
husk_config=/etc/husk/configuration.toml

# Copies $1 to $root$2 with mode $3 unless identical (so reruns are no-ops).
put() {
  local src="$1" dst="$root$2" mode="$3"
  if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
    echo "install: $2 is up to date"
    return
  fi
  install -D -m "$mode" "$src" "$dst.husk-new"
  mv -f "$dst.husk-new" "$dst"
  echo "install: $2"
}

put "$bin_dir/containerd-shim-husk-v2" "$prefix/bin/containerd-shim-husk-v2" 0755
put "$bin_dir/husk-vmm" "$prefix/bin/husk-vmm" 0755
put "$guest_dir/vmlinux" "$share/vmlinux" 0644
put "$guest_dir/initrd.img" "$share/initrd.img" 0644

# The shim's configuration: where this install put the guest and husk-vmm.
tmp="$(mktemp)"
trap 'rm -f "$tmp" "$tmp.ctd"' EXIT
cat >"$tmp" <<EOF
# husk runtime configuration (written by scripts/install.sh; see README).
[hypervisor]
kind = "auto"
accel = "auto"
kernel = "$share/vmlinux"
initrd = "$share/initrd.img"
vmm_path = "$prefix/bin/husk-vmm"
vcpus = 1
memory_mib = 256
[shim]
log_level = "info"
EOF
if [ -f "$root$husk_config" ] && ! cmp -s "$tmp" "$root$husk_config"; then
  if ((force)); then
    cp -p "$root$husk_config" "$root$husk_config.bak"
    echo "install: replacing $husk_config (old one kept as $husk_config.bak)"
    put "$tmp" "$husk_config" 0644
  else
    echo "install: $husk_config exists and differs from husk's default; keeping it (--force replaces it)"
  fi
else
  put "$tmp" "$husk_config" 0644
fi

if ((register)); then
  begin="# BEGIN husk runtime (scripts/install.sh)"
  end="# END husk runtime"
  cfg="$root$containerd_config"
  # The config's own version, else the one the installed containerd writes.
  if [ -f "$cfg" ]; then
    found="$(sed -nE 's/^\s*version\s*=\s*([0-9]+).*/\1/p' "$cfg" | head -n1)"
    [ -n "$found" ] || die "$containerd_config has no 'version = N' line; add the husk handler by hand (deploy/containerd-husk*.toml)"
    if [ -n "$config_version" ] && [ "$config_version" != "$found" ]; then
      die "--config-version $config_version, but $containerd_config is version $found"
    fi
    config_version="$found"
  elif [ -z "$config_version" ]; then
    config_version=2
    if command -v containerd >/dev/null \
      && containerd --version 2>/dev/null | awk '{print $3}' | grep -qE '^v?[2-9]\.'; then
      config_version=3
    fi
  fi
  case "$config_version" in
    2) template="$here/deploy/containerd-husk.toml" ;;
    3) template="$here/deploy/containerd-husk-v3.toml" ;;
    *) die "$containerd_config is version $config_version; husk knows versions 2 and 3 (deploy/containerd-husk*.toml)" ;;
  esac
  block="$(printf '%s\n' "$begin"; grep -v '^#' "$template" \
    | sed "s|/etc/husk/configuration.toml|$husk_config|"; printf '%s\n' "$end")"
  if [ -f "$cfg" ]; then
    # The handler's section, as CRI's config sees it (either version, either quotes),
    # outside husk's block.
    outside="$(sed "\\|^$begin\$|,\\|^$end\$|d" "$cfg")"
    if grep -qE "^\s*\[plugins\.[\"']io\.containerd\.(grpc\.v1\.cri|cri\.v1\.runtime)[\"']\.containerd\.runtimes\.husk\]" <<<"$outside"; then
      die "$containerd_config already defines a 'husk' runtime outside husk's block; not touching it"
    fi
    if grep -qE 'disabled_plugins\s*=.*io\.containerd\.(grpc\.v1\.cri|cri\.v1\.runtime)' "$cfg"; then
      echo "install: warning: $containerd_config disables the CRI plugin; Kubernetes will not reach husk" >&2
    fi
    printf '%s\n%s\n' "$outside" "$block" >"$tmp.ctd"
  else
    printf 'version = %s\n%s\n' "$config_version" "$block" >"$tmp.ctd"
  fi
  if [ -f "$cfg" ] && cmp -s "$tmp.ctd" "$cfg"; then
    echo "install: $containerd_config already registers the husk handler"
  else
    if command -v containerd >/dev/null && [ -z "$root" ]; then
      containerd --config "$tmp.ctd" config dump >/dev/null \
        || die "the new $containerd_config would not load; left unchanged"
    fi
    [ -f "$cfg" ] && cp -p "$cfg" "$cfg.husk-bak"
    install -D -m 0644 "$tmp.ctd" "$cfg"
    echo "install: registered the husk handler in $containerd_config (restart containerd to apply)"
  fi
fi
echo "install: done. Kubernetes: kubectl apply -f $here/deploy/runtimeclass.yaml"
