#!/usr/bin/env bash
# reverse-stepi in the GDB stub with in-memory session snapshots (default)
# vs without (REVIRT_GDB_SNAPSHOTS=0: every step back restores a recording
# checkpoint and rolls forward), side by side on the same recording.
#   bash scripts/bench-reverse-stepi.sh [AT] [N] [ROUNDS]
# Records `race iters=2000000 exits=16` with --checkpoint-every 100ms
# (~261k exits) unless REC=dir is given; serves it twice at exit AT
# (default 200000); each round connects gdb to each server in turn and
# times N reverse-stepi one by one (gdb's Python, connect excluded), then
# checks that both servers stopped at the same registers.
# BEFORE_BIN=path/to/an/older/revirt adds a third server run by that binary
# (e.g. one built from the commit before snapshots), compared the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
AT=${1:-200000}; N=${2:-10}; ROUNDS=${3:-3}
cargo build --release --quiet
R=./target/release/revirt; G=guests/demo/out/vm.img
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
REC=${REC:-}
if [ -z "$REC" ]; then
  REC=$tmp/rec
  $R record $G -o "$REC" --cmdline "workload=race iters=2000000 exits=16" --checkpoint-every 100ms </dev/null >/dev/null 2>&1
fi
serve() { # $1 = name, $2 = REVIRT_GDB_SNAPSHOTS value, $3 = binary
  REVIRT_GDB_SNAPSHOTS=$2 ${3:-$R} gdb "$REC" --port 0 --at "$AT" 2>"$tmp/srv-$1" &
  pids+=($!)
}
serve on 1; serve off 0
modes="off on"
if [ -n "${BEFORE_BIN:-}" ]; then serve before 1 "$BEFORE_BIN"; modes="before off on"; fi
port() { for _ in $(seq 600); do p=$(grep -o "listening on 127.0.0.1:[0-9]*" "$tmp/srv-$1" | head -1 | cut -d: -f2); [ -n "$p" ] && { echo "$p"; return; }; sleep 0.1; done; echo "server $1 did not start" >&2; exit 1; }
declare -A P
all=()
for m in $modes; do P[$m]=$(port $m); done
cat > "$tmp/t.py" <<PY
import time, gdb
ts = []
for i in range($N):
    t = time.time(); gdb.execute("reverse-stepi", to_string=True); ts.append((time.time() - t) * 1000)
print("MS " + " ".join("%.1f" % x for x in ts))
PY
run() { gdb -nx -batch -ex "set architecture i386:x86-64" -ex "target remote 127.0.0.1:$1" -x "$tmp/t.py" \
  -ex "info registers" -ex "monitor where" -ex "monitor stats" -ex disconnect 2>&1; }
for r in $(seq "$ROUNDS"); do
  for m in $modes; do
    run "${P[$m]}" > "$tmp/out-$m-$r"
    grep '^MS ' "$tmp/out-$m-$r" | sed "s/^MS/$m round $r (ms):/"
  done
  for m in $modes; do
    diff <(grep -v '^MS \|single-stepped\|^snapshots' "$tmp/out-$m-$r") <(grep -v '^MS \|single-stepped\|^snapshots' "$tmp/out-on-$r") >/dev/null \
      || { echo "round $r: servers '$m' and 'on' stopped in different states" >&2; exit 1; }
  done
done
grep -h 'steps); next event' "$tmp/out-on-$ROUNDS" | sed 's/^/final position: /'
grep -h '^snapshots' "$tmp/out-on-$ROUNDS" || true
for m in $modes; do
  cat "$tmp"/out-$m-* | grep '^MS ' | cut -d' ' -f2- | tr ' ' '\n' | sort -n | awk -v m=$m '{a[NR]=$1} END {printf "%-6s: %d reverse-stepi, median %.1f ms, max %.1f ms, first of round 1 included\n", m, NR, a[int((NR+1)/2)], a[NR]}'
done
# The first step back across an exit boundary after a long exit interval:
# `compute iters=LONG_ITERS` (default 2000000, ~3e7 ring-3 instructions)
# runs its loop without an exit. A fresh server stands at the boundary
# right after the first exit that follows the loop; the first reverse-stepi
# there goes back into that interval (counted at native speed), then N-1
# more. LONG=0 skips this part.
[ "${LONG:-1}" = 0 ] && exit 0
LONG_ITERS=${LONG_ITERS:-2000000}
$R record $G -o "$tmp/long" --cmdline "workload=compute iters=$LONG_ITERS" </dev/null >/dev/null 2>&1
lserve() { # $1 = name, $2 = --at
  $R gdb "$tmp/long" --port 0 --at "$2" 2>"$tmp/srv-$1" &
  pids+=($!)
}
lserve where 0
cat > "$tmp/w.py" <<'PY'
import gdb
gdb.execute("break wl_compute", to_string=True)
gdb.execute("continue", to_string=True)
print(gdb.execute("monitor where", to_string=True))
PY
w=$(gdb -nx -batch -ex "set architecture i386:x86-64" -ex "file $G" -ex "target remote 127.0.0.1:$(port where)" -x "$tmp/w.py" -ex disconnect 2>&1)
E0=$(grep -o '(exit [0-9]*' <<<"$w" | head -1 | cut -d' ' -f2)
[ -n "$E0" ] || { echo "could not find the exit count at wl_compute: $w" >&2; exit 1; }
firsts=()
for r in $(seq "$ROUNDS"); do
  lserve "long$r" $((E0 + 1))
  out=$(gdb -nx -batch -ex "set architecture i386:x86-64" -ex "file $G" -ex "target remote 127.0.0.1:$(port long$r)" -x "$tmp/t.py" \
    -ex "x/i \$pc" -ex "monitor where" -ex "monitor stats" -ex disconnect 2>&1)
  ms=$(grep '^MS ' <<<"$out" | cut -d' ' -f2-)
  echo "long round $r (ms): $ms"
  [ "$r" = 1 ] && { grep -m1 '=> ' <<<"$out" | sed "s/^/  after $N steps back: /"; grep -m1 'single-stepped' <<<"$out" | sed 's/^/  /'; }
  firsts+=("$(cut -d' ' -f1 <<<"$ms")")
  all+=($ms)
done
printf '%s\n' "${firsts[@]}" | sort -n | awk -v e=$E0 -v it=$LONG_ITERS '{a[NR]=$1} END {printf "long interval (compute iters=%s, the loop in exit interval %d): first reverse-stepi across the boundary, median %.1f ms, max %.1f ms (%d rounds)\n", it, e, a[int((NR+1)/2)], a[NR], NR}'
printf '%s\n' "${all[@]}" | sort -n | awk '{a[NR]=$1} END {printf "long interval: all reverse-stepi, median %.1f ms, max %.1f ms (%d)\n", a[int((NR+1)/2)], a[NR], NR}'
