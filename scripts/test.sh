#!/usr/bin/env bash
# The whole test suite (unit + end-to-end on real KVM). CI runs exactly this.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh || exit 1
log=$(mktemp)
cargo test --release --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# PMU-only tests pass trivially without a PMU; show what they say about why.
cargo test --release -q real_ -- --nocapture 2>&1 | grep -i "skipping" || true
# One closing line for the whole suite.
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '^test result: .* ([0-9]+) failed' "$log" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
rm -f "$log"
echo "${passed} passed, ${failed} failed"
exit "$status"
