#!/usr/bin/env bash
# The end of `make test`: every fuzz target (fuzz/) for a few seconds, so a
# crash the corpus or a regression input already reaches fails the suite. The
# long runs are `make fuzz`. Needs cargo-fuzz and a nightly toolchain (make
# setup installs cargo-fuzz); without them this is a recorded skip, and a
# failure under CI=true / HUSK_REQUIRE=all.
set -uo pipefail
secs=${1:-10}
missing=
command -v cargo-fuzz >/dev/null 2>&1 || missing="cargo-fuzz (make test-deps installs it)"
[ -z "$missing" ] && ! cargo +nightly --version >/dev/null 2>&1 && missing="a nightly toolchain (rustup toolchain install nightly)"
if [ -n "$missing" ]; then
  why="no $missing"
  echo "SKIPPED fuzz-smoke: $why"
  [ -n "${HUSK_SKIP_LOG:-}" ] && echo "fuzz-smoke: $why" >> "$HUSK_SKIP_LOG"
  if [ "${CI:-}" = true ] || [[ ",${HUSK_REQUIRE:-}," == *,all,* ]] || [[ ",${HUSK_REQUIRE:-}," == *,fuzz-smoke,* ]]; then
    echo "fuzz-smoke: CI provides it, so this is a failure" >&2
    exit 1
  fi
  exit 0
fi
echo "== every fuzz target for ${secs} s"
bash "$(dirname "$0")/../fuzz/run.sh" "$secs"
