#!/usr/bin/env bash
# One command for a newcomer: install what is missing, build revirt and the
# demo guest, check the host, and run the demo guest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release --quiet
./target/release/revirt doctor
echo
echo "== revirt run guests/demo/out/vm.img --cmdline workload=demo"
./target/release/revirt run guests/demo/out/vm.img --cmdline workload=demo </dev/null
