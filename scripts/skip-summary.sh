#!/usr/bin/env bash
# The closing line of `make test`: how many tests skipped and which (from the
# log testing/skip appends to), and how many passed only after a retry of the
# emulated host's own faults (testing/nested-svm). The details come first, the
# one counting line last. Always exits 0: whether a skip is a failure is
# decided by the test itself (CI=true / HUSK_REQUIRE).
skip_log=${1:?usage: skip-summary.sh SKIP_LOG [RETRY_LOG]}
retry_log=${2:-}

# count LOG KIND SORT: the detail lines, then sets $n and $names. A skip recorded
# twice is one skip (SORT=sort -u); every retry counts (SORT=sort).
count() {
  n=0 names=
  [ -n "$1" ] && [ -s "$1" ] || return 0
  $3 "$1" | sed "s/^/  $2 /"
  n=$($3 "$1" | wc -l)
  names=" ($(cut -d: -f1 "$1" | sort -u | paste -sd, - | sed 's/,/, /g'))"
}

count "$skip_log" skipped "sort -u"
line="skipped: $n$names"
if [ -n "$retry_log" ]; then
  count "$retry_log" retried sort
  line="$line; retried: $n$names"
fi
echo "$line"
