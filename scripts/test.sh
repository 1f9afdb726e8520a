#!/usr/bin/env bash
# The whole test suite (unit + end-to-end on real KVM). CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo test --release --no-fail-fast 2>&1
