#!/usr/bin/env bash
# reverse-continue over a long span vs forward replay of the same span.
# Records `compute iters=N` (one exit-free ring-3 loop of ~15*N instructions
# between the start and the end), serves it to gdb, runs to the end, sets a
# breakpoint at wl_compute (hit once, near the start) and times
# reverse-continue back to it; compares with `revirt replay -q` of the whole
# recording (which covers the same span forwards).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-3000}
cargo build --release --quiet
R=./target/release/revirt; G=guests/demo/out/vm.img
tmp=$(mktemp -d); trap 'pkill -f "revirt gdb $tmp" || true; rm -rf "$tmp"' EXIT
$R record $G --cmdline "workload=compute iters=$N" -o "$tmp/rec" </dev/null >/dev/null 2>&1
s=$(date +%s.%N); $R replay -q "$tmp/rec" 2>/dev/null; fwd=$(echo "$(date +%s.%N) - $s" | bc)
$R gdb "$tmp/rec" --port 0 2>"$tmp/srv" & sleep 1
port=$(grep -o "127.0.0.1:[0-9]*" "$tmp/srv" | head -1 | cut -d: -f2)
g() { gdb -nx -batch -ex "set architecture i386:x86-64" -ex "target remote 127.0.0.1:$port" "$@" -ex disconnect $G >/dev/null 2>&1; }
s=$(date +%s.%N); g -ex continue -ex "break wl_compute"; base=$(echo "$(date +%s.%N) - $s" | bc)
s=$(date +%s.%N); g -ex continue -ex "break wl_compute" -ex reverse-continue; with=$(echo "$(date +%s.%N) - $s" | bc)
rc=$(echo "$with - $base" | bc)
printf 'compute iters=%s: forward replay %.2f s, reverse-continue over the same span %.2f s, ratio %.1fx (target <= 1.5x)\n' \
  "$N" "$fwd" "$rc" "$(echo "$rc / $fwd" | bc -l)"
