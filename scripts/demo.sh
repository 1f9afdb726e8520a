#!/usr/bin/env bash
# One command for a newcomer: install what is missing, build revirt and the
# demo guest, check the host, then record the demo guest and replay it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release --quiet
R=./target/release/revirt
G=guests/demo/out/vm.img
$R doctor
echo
rec=recordings/demo-$(date +%Y%m%d-%H%M%S)
echo "== $R record $G --cmdline workload=demo -o $rec"
$R record $G --cmdline workload=demo -o "$rec" </dev/null
echo
echo "== $R replay $rec"
$R replay "$rec"
