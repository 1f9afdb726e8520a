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
rec=recordings/race-$(date +%Y%m%d-%H%M%S)
# Two ring-3 tasks racing under a 1 kHz timer; exits=16 puts a port read in
# every 16th racy window so the exit clock's interrupts preempt there: the
# result differs from run to run, and the replay reproduces this one exactly.
cmd="workload=race iters=200000 exits=16"
echo "== $R record $G --cmdline '$cmd' -o $rec"
$R record $G --cmdline "$cmd" -o "$rec" </dev/null
echo
echo "== $R replay $rec"
$R replay "$rec"
echo
echo "Next: $R gdb $rec   (then: gdb $G -ex 'target remote :1234'; reverse-stepi, reverse-continue)"
echo "      $R inspect $rec"
echo "      live migration: $R receive --listen 127.0.0.1:4444   (one terminal)"
echo "                      $R run $G --cmdline 'workload=churn iters=1000 pages=1000 hz=100' --control /tmp/vm.sock   (another)"
echo "                      $R migrate /tmp/vm.sock --to 127.0.0.1:4444   (a third; docs/migration.md)"
