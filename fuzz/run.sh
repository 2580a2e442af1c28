#!/usr/bin/env bash
# Builds and runs husk-vmm's fuzz targets one after another.
#
#   fuzz/run.sh SECONDS [TARGET...]
#
# Runs every target (or those named) for SECONDS each, single process and single thread,
# niced, starting from the seeds in fuzz/corpus/<target>/ plus whatever earlier runs found
# (fuzz/work/<target>/, git-ignored; new inputs are written there, never to the seeds).
# Prints one line per target:
#
#   fuzz <target>: <execs> execs, <execs/s> exec/s, <crashes> crashes, cov: <cov>
#
# and exits non-zero if any target crashed (crash, timeout, OOM, leak). Crashing inputs land
# in fuzz/artifacts/<target>/; full logs in fuzz/work/<target>.log.
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`) and a nightly toolchain
# (AddressSanitizer, debug assertions and overflow checks, cargo-fuzz's defaults).
# FUZZ_TOOLCHAIN (default: nightly) and FUZZ_ARGS (extra libFuzzer flags) override.
set -uo pipefail

usage() { echo "usage: $0 SECONDS [TARGET...]" >&2; exit 2; }
[[ $# -ge 1 && $1 =~ ^[0-9]+$ ]] || usage
secs=$1; shift

here=$(cd "$(dirname "$0")" && pwd)
cd "$here" || exit 2
toolchain=${FUZZ_TOOLCHAIN:-nightly}

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo "+$toolchain" fuzz list)
fi

echo "building ${targets[*]}" >&2
if ! nice -n 19 cargo "+$toolchain" fuzz build >"$here/build.log" 2>&1; then
    tail -n 40 "$here/build.log" >&2
    echo "fuzz build failed (log: fuzz/build.log)" >&2
    exit 2
fi

failed=0
for t in "${targets[@]}"; do
    work="$here/work/$t"
    art="$here/artifacts/$t"
    log="$here/work/$t.log"
    mkdir -p "$work" "$art" "$here/corpus/$t"
    before=$(find "$art" -type f | wc -l)
    # One process, one thread: libFuzzer's default (-jobs/-workers would only add a
    # supervisor that moves this output into fuzz-N.log files).
    # shellcheck disable=SC2086
    # Crashes found before (fuzz/regressions/<target>/) are run first, as part of the corpus.
    regress=()
    [[ -d "$here/regressions/$t" ]] && regress=("$here/regressions/$t")
    nice -n 19 cargo "+$toolchain" fuzz run "$t" "$work" "$here/corpus/$t" "${regress[@]}" -- \
        -max_total_time="$secs" -print_final_stats=1 -timeout=25 -rss_limit_mb=4096 \
        -max_len=16384 -artifact_prefix="$art/" ${FUZZ_ARGS:-} >"$log" 2>&1
    rc=$?
    after=$(find "$art" -type f | wc -l)
    crashes=$((after - before))
    if [[ $rc -ne 0 && $crashes -eq 0 ]]; then
        crashes=1 # died without leaving an artifact (e.g. a build error): still a failure
    fi
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -n1 | grep -o '[0-9]*$')
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | tail -n1 | grep -o '[0-9]*$')
    cov=$(grep -oE '^#[0-9]+.*cov: [0-9]+' "$log" | tail -n1 | grep -oE '[0-9]+$')
    echo "fuzz $t: ${execs:-?} execs, ${rate:-?} exec/s, $crashes crashes, cov: ${cov:-?}"
    if [[ $crashes -ne 0 ]]; then
        failed=1
        grep -m1 -E 'panicked at|ERROR: (libFuzzer|AddressSanitizer)' "$log" >&2 || tail -n 20 "$log" >&2
        echo "  log: fuzz/work/$t.log, artifacts: fuzz/artifacts/$t/" >&2
    fi
done
exit $failed
