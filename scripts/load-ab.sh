#!/usr/bin/env bash
# Two `hearth` binaries under the same load, in alternating rounds (A B, B A,
# A B, ...), so a slow phase of the machine hits both alike: the warm `hello`
# row of scripts/load.sh for each, then the median of each side and the ratio
# B / A, and the median of the rounds' own ratios (robust to a slow phase
# that hits one round). Any knob of scripts/load.sh (HEARTH_LOAD_METERING, HEARTH_LOAD_DEFAULTS,
# HEARTH_LOAD_ROWS) applies to both.
#   scripts/load-ab.sh A_BIN B_BIN [ROUNDS] [DURATION] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
a="$(realpath "$1")" b="$(realpath "$2")"
rounds="${3:-5}" duration="${4:-8}" connections="${5:-32}"
rate() { # binary -> req/s of the warm hello row
  HEARTH_BIN="$1" HEARTH_LOAD_ROWS="${HEARTH_LOAD_ROWS:-^hello$}" HEARTH_LOAD_REFERENCE=off \
    scripts/load.sh "$duration" "$connections" |
    awk '/warm instances reused/ { warm = 1 } warm && /Requests\/sec/ { print $2; exit }'
}
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
as=() bs=() ratios=()
for round in $(seq 1 "$rounds"); do
  if [ $((round % 2)) = 1 ]; then
    ra="$(rate "$a")"; rb="$(rate "$b")"
  else
    rb="$(rate "$b")"; ra="$(rate "$a")"
  fi
  as+=("$ra") bs+=("$rb") ratios+=("$(awk -v a="$ra" -v b="$rb" 'BEGIN { print b / a }')")
  echo "round $round: A $ra req/s, B $rb req/s"
done
ma="$(printf '%s\n' "${as[@]}" | median)" mb="$(printf '%s\n' "${bs[@]}" | median)"
mr="$(printf '%s\n' "${ratios[@]}" | median)"
echo "median: A $ma req/s, B $mb req/s, B/A $(awk -v a="$ma" -v b="$mb" 'BEGIN { printf "%.3f", b / a }'), median of round ratios $(awk -v r="$mr" 'BEGIN { printf "%.3f", r }')"
