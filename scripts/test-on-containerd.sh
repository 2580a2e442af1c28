#!/usr/bin/env bash
# Runs the tests that drive a real containerd once more, on the containerd
# whose binaries are in DIR (containerd 2.3, what current Kubernetes needs;
# the first pass of `make test` used Debian's 1.6 on PATH). Variants that run
# inside the emulated KVM host are left out: they do not use containerd.
#
#   test-on-containerd.sh DIR TEST...
#
# A missing DIR is a skip, recorded for make test's closing line, and a
# failure under CI=true / HUSK_REQUIRE=all (make test, through make test-deps, installs it).
set -uo pipefail
dir=${1:?usage: test-on-containerd.sh DIR TEST...}
shift
if [ ! -x "$dir/containerd" ] || [ ! -x "$dir/ctr" ]; then
  why="no containerd and ctr in $dir (make test-deps installs containerd 2.3 from ../shared/tools/containerd-2.3)"
  echo "SKIPPED containerd-2.3: $why"
  [ -n "${HUSK_SKIP_LOG:-}" ] && echo "containerd-2.3: $why" >> "$HUSK_SKIP_LOG"
  if [ "${CI:-}" = true ] || [[ ",${HUSK_REQUIRE:-}," == *,all,* ]] || [[ ",${HUSK_REQUIRE:-}," == *,containerd-2.3,* ]]; then
    echo "containerd-2.3: CI provides it, so this is a failure" >&2
    exit 1
  fi
  exit 0
fi
echo "== the containerd tests again, on $("$dir/containerd" --version | awk '{print $3}') ($dir)"
args=()
for t in "$@"; do args+=(--test "$t"); done
HUSK_CONTAINERD_DIR=$dir ${CARGO:-cargo} test -p husk-tests "${args[@]}" -- \
  --test-threads=2 --skip emulated_kvm_host --skip emulated_svm_host
