#!/usr/bin/env bash
# The closing line of `make test`: how many tests skipped, and which (from the
# log testing/skip appends to). Always exits 0: whether a skip is a failure is
# decided by the test itself (CI=true / HUSK_REQUIRE).
log=${1:?usage: skip-summary.sh SKIP_LOG}
if [ ! -s "$log" ]; then
  echo "skipped: 0"
  exit 0
fi
n=$(sort -u "$log" | wc -l)
names=$(sort -u "$log" | cut -d: -f1 | paste -sd, - | sed 's/,/, /g')
echo "skipped: $n ($names)"
sort -u "$log" | sed 's/^/  skipped /'
