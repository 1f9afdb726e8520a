#!/usr/bin/env bash
# Determinism under stress: N record/replay runs per clock of the racy
# workload (and the echo workload with serial input), with randomized
# interrupt timing (timer rate, exit density, work) and input timing.
# Every replay must match its recording (output and final state hash).
# Usage: scripts/stress.sh [N=100] [clocks="exit step pmu-sim"]
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:-100}
CLOCKS=${2:-"exit step pmu-sim"}
cargo build --release --quiet
R=./target/release/revirt
G=guests/demo/out/vm.img
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '%-8s %6s %8s %8s %10s\n' clock runs matched failed distinct
for clock in $CLOCKS; do
  ok=0; bad=0; : > "$tmp/results"
  for i in $(seq 1 "$N"); do
    hz=$((500 + RANDOM % 3000))
    if [[ $clock == exit ]]; then iters=$((5000 + RANDOM % 20000)); extra="exits=$((4 + RANDOM % 32))"
    else iters=$((20 + RANDOM % 120)); extra=""; fi
    dir="$tmp/r$i"
    if (( i % 4 == 0 )); then
      # serial input arriving at random moments
      { for l in 1 2 3; do sleep "0.0$((RANDOM % 9))"; echo "line $l $RANDOM"; done; echo quit; } |
        $R record $G --cmdline "workload=echo" --clock "$clock" -o "$dir" >"$dir.out" 2>/dev/null
    else
      $R record $G --cmdline "workload=race iters=$iters hz=$hz $extra" --clock "$clock" \
        --checkpoint-every 50ms -o "$dir" </dev/null >"$dir.out" 2>/dev/null
    fi
    grep -h "race:" "$dir.out" >> "$tmp/results"
    if $R replay -q "$dir" --clock "$clock" 2>"$dir.replay" && grep -q "replay matches" "$dir.replay"; then
      ok=$((ok + 1))
    else
      bad=$((bad + 1)); echo "MISMATCH $clock run $i: $(tail -1 "$dir.replay")" >&2
    fi
    rm -rf "$dir"
  done
  printf '%-8s %6d %8d %8d %10d\n' "$clock" "$N" "$ok" "$bad" "$(sed 's/ticks=.*//' "$tmp/results" | sort -u | wc -l)"
done
