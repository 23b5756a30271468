#!/usr/bin/env bash
# Two `hearth` binaries under the same load, in alternating rounds (A B, B A,
# A B, ...), so a slow phase of the machine hits both alike: the warm `hello`
# row of scripts/load.sh for each, then the median of each side and the ratio
# B / A, and the median of the rounds' own ratios (robust to a slow phase
# that hits one round), and the medians of the server's CPU time per request
# (steadier than throughput here). Any knob of scripts/load.sh (HEARTH_LOAD_METERING, HEARTH_LOAD_DEFAULTS,
# HEARTH_LOAD_ROWS) applies to both.
#   scripts/load-ab.sh A_BIN B_BIN [ROUNDS] [DURATION] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
a="$(realpath "$1")" b="$(realpath "$2")"
rounds="${3:-5}" duration="${4:-8}" connections="${5:-32}"
rate() { # binary -> "req/s CPU-us-per-request" of the warm hello row
  HEARTH_BIN="$1" HEARTH_LOAD_ROWS="${HEARTH_LOAD_ROWS:-^hello$}" HEARTH_LOAD_REFERENCE=off \
    scripts/load.sh "$duration" "$connections" |
    awk '/warm instances reused/ { warm = 1 } warm && /Requests\/sec/ { r = $2 } warm && /CPU\/request/ { print r, $3; exit }'
}
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
as=() bs=() ratios=() acpu=() bcpu=()
for round in $(seq 1 "$rounds"); do
  if [ $((round % 2)) = 1 ]; then
    read -r ra ca <<<"$(rate "$a")"; read -r rb cb <<<"$(rate "$b")"
  else
    read -r rb cb <<<"$(rate "$b")"; read -r ra ca <<<"$(rate "$a")"
  fi
  as+=("$ra") bs+=("$rb") acpu+=("$ca") bcpu+=("$cb")
  ratios+=("$(awk -v a="$ra" -v b="$rb" 'BEGIN { print b / a }')")
  echo "round $round: A $ra req/s ($ca us CPU/request), B $rb req/s ($cb us)"
done
ma="$(printf '%s\n' "${as[@]}" | median)" mb="$(printf '%s\n' "${bs[@]}" | median)"
mr="$(printf '%s\n' "${ratios[@]}" | median)"
mca="$(printf '%s\n' "${acpu[@]}" | median)" mcb="$(printf '%s\n' "${bcpu[@]}" | median)"
echo "median: A $ma req/s, B $mb req/s, B/A $(awk -v a="$ma" -v b="$mb" 'BEGIN { printf "%.3f", b / a }'), median of round ratios $(awk -v r="$mr" 'BEGIN { printf "%.3f", r }')"
echo "server CPU per request, medians: A $mca us, B $mcb us, A/B $(awk -v a="$mca" -v b="$mcb" 'BEGIN { printf "%.3f", a / b }') (above 1: B spends less per request)"
