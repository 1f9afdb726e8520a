#!/usr/bin/env bash
# The search engine at native speed (issue 14): gdb `break power_off` +
# `continue` from the start, and `break wl_compute` + `reverse-continue`
# from the end, against `revirt replay -q` of the same recording, side by
# side in one run; then the same with the single-stepping path
# (REVIRT_GDB_NATIVE=0) on a short recording, for the before/after.
#   bash scripts/bench-search.sh [ITERS] [ROUNDS]
# ITERS: compute iterations (default 100000000, ~1.5e9 ring-3 instructions).
# ROWS (env): the rows to run, default "watch rwatch awatch compute ring0 race before history"
# (history: inspect's `history` and `last-write` on the engine, issue 19).
# Prints one line per measurement and the ratios to replay (target <= 1.5x).
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS=${1:-100000000}; ROUNDS=${2:-3}
cargo build --release --quiet
R=$PWD/target/release/revirt; G=guests/demo/out/vm.img
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
now() { date +%s.%N; }
record() { # $1 dir, $2 cmdline
  $R record $G -o "$1" --cmdline "$2" </dev/null >/dev/null 2>&1
}
serve() { # $1 rec, $2 log, env in $3; sets $port
  env ${3:-} $R gdb "$1" --port 0 >/dev/null 2>"$2" & pids+=($!)
  port=
  for _ in $(seq 600); do port=$(grep -so "listening on 127.0.0.1:[0-9]*" "$2" | head -1 | cut -d: -f2 || true); [ -n "$port" ] && return; sleep 0.1; done
  echo "server did not start" >&2; exit 1
}
# gdb: times one command with gdb's Python (connection excluded).
timed_gdb() { # $1 port, $2 setup cmds (;-separated), $3 timed cmd, $4 final cmds
  cat > "$tmp/t.py" <<PY
import time, gdb
for c in """$2""".split(";"):
    c = c.strip()
    if c: gdb.execute(c, to_string=True)
t = time.time(); out = gdb.execute("$3", to_string=True); ms = (time.time() - t) * 1000
print("MS %.1f" % ms)
print(out)
for c in """$4""".split(";"):
    c = c.strip()
    if c: print(gdb.execute(c, to_string=True))
PY
  gdb -nx -batch -ex "set architecture i386:x86-64" -ex "file $G" -ex "target remote 127.0.0.1:$1" -x "$tmp/t.py" -ex "kill" 2>&1 || true
}
med() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

bench() { # $1 name, $2 cmdline, $3 break-forward sym, $4 break-reverse sym
  local rec=$tmp/$1
  record "$rec" "$2"
  local rep=() fwd=() rev=()
  for r in $(seq "$ROUNDS"); do
    t0=$(now); $R replay "$rec" -q >/dev/null 2>&1; t1=$(now)
    rep+=("$(awk "BEGIN{print ($t1 - $t0) * 1000}")")
    serve "$rec" "$tmp/srv-$1-$r"
    out=$(timed_gdb "$port" "break $3" "continue" "info registers rip;monitor stats")
    grep -q "Breakpoint 1" <<<"$out" || { echo "$1: continue did not stop at $3:"; echo "$out"; exit 1; }
    fwd+=("$(echo "$out" | grep '^MS' | cut -d' ' -f2)")
    kill "${pids[-1]}" 2>/dev/null || true
    serve "$rec" "$tmp/srv2-$1-$r"
    out=$(timed_gdb "$port" "continue;break $4" "reverse-continue" "info registers rip;monitor stats")
    grep -q "Breakpoint 1" <<<"$out" || { echo "$1: reverse-continue did not stop at $4:"; echo "$out"; exit 1; }
    rev+=("$(echo "$out" | grep '^MS' | cut -d' ' -f2)")
    kill "${pids[-1]}" 2>/dev/null || true
  done
  local mr mf mv
  mr=$(printf '%s\n' "${rep[@]}" | med); mf=$(printf '%s\n' "${fwd[@]}" | med); mv=$(printf '%s\n' "${rev[@]}" | med)
  printf '%-44s replay -q %8.0f ms | continue to %-10s %8.0f ms (%.2fx) | reverse-continue to %-10s %8.0f ms (%.2fx)\n' \
    "$1 ($2)" "$mr" "$3" "$mf" "$(awk "BEGIN{print $mf / $mr}")" "$4" "$mv" "$(awk "BEGIN{print $mv / $mr}")"
}
# `watch -l` (or `rwatch -l`, `awatch -l`) on a location written once
# early (the scheduler's cur_task, set before the workload starts),
# reverse-continue from the end: to the write (watch), to the last read
# (rwatch), to the last access (awatch).
bench_watch() { # $1 name, $2 cmdline, $3 variable, $4 gdb command (watch, rwatch, awatch)
  local rec=$tmp/w$1 cmd=${4:-watch}
  [ -d "$rec" ] || record "$rec" "$2"
  local rep=() rev=()
  for r in $(seq "$ROUNDS"); do
    t0=$(now); $R replay "$rec" -q >/dev/null 2>&1; t1=$(now)
    rep+=("$(awk "BEGIN{print ($t1 - $t0) * 1000}")")
    serve "$rec" "$tmp/srvw-$1-$cmd-$r"
    out=$(timed_gdb "$port" "continue;$cmd -l $3" "reverse-continue" "x/i \$pc;monitor stats")
    grep -q "atchpoint" <<<"$out" || { echo "$1: reverse-continue did not stop at a $cmd hit of $3:"; echo "$out"; exit 1; }
    rev+=("$(grep '^MS' <<<"$out" | cut -d' ' -f2)")
    [ "$r" = 1 ] && grep -m1 '=> ' <<<"$out" | sed "s/^/  $cmd stops at: /"
    kill "${pids[-1]}" 2>/dev/null || true
  done
  local mr mv
  mr=$(printf '%s\n' "${rep[@]}" | med); mv=$(printf '%s\n' "${rev[@]}" | med)
  printf '%-44s replay -q %8.0f ms | %s -l %s + reverse-continue %8.0f ms (%.2fx)\n' "$1 ($2)" "$mr" "$cmd" "$3" "$mv" "$(awk "BEGIN{print $mv / $mr}")"
}
# inspect on the same engine: `history` of a location (every write, then
# with --reads) over the whole recording, and `last-write` from the end,
# each against `revirt replay -q` of the same recording.
bench_history() { # $1 name, $2 cmdline, $3 variable
  local rec=$tmp/h$1
  record "$rec" "$2"
  local rep=() hw=() hr=() lw=() lq=() out
  for r in $(seq "$ROUNDS"); do
    t0=$(now); $R replay "$rec" -q >/dev/null 2>&1; t1=$(now)
    rep+=("$(awk "BEGIN{print ($t1 - $t0) * 1000}")")
    t0=$(now); out=$($R inspect "$rec" -c "history $3 8 start end" 2>/dev/null); t1=$(now)
    grep -q "native speed" <<<"$out" || { echo "history did not run natively:"; echo "$out"; exit 1; }
    hw+=("$(awk "BEGIN{print ($t1 - $t0) * 1000}")")
    [ "$r" = 1 ] && sed 's/^/  history: /' <<<"$out" | grep -v '^  history: $' | head -6
    t0=$(now); out=$($R inspect "$rec" -c "history $3 8 start end --reads" 2>/dev/null); t1=$(now)
    hr+=("$(awk "BEGIN{print ($t1 - $t0) * 1000}")")
    [ "$r" = 1 ] && tail -1 <<<"$out" | sed 's/^/  history --reads: /'
    t0=$(now); out=$($R inspect "$rec" --at end -c "last-write $3 8" 2>/dev/null); t1=$(now)
    grep -q "written by the instruction" <<<"$out" || { echo "last-write found no writer:"; echo "$out"; exit 1; }
    lq+=("$(grep -o 'searched in [0-9]*' <<<"$out" | awk '{print $3}')")
    lw+=("$(awk "BEGIN{print ($t1 - $t0) * 1000}")")
    [ "$r" = 1 ] && grep -m1 "written by" <<<"$out" | sed 's/^ */  last-write: /'
  done
  local mr a b c q
  mr=$(printf '%s\n' "${rep[@]}" | med); a=$(printf '%s\n' "${hw[@]}" | med)
  b=$(printf '%s\n' "${hr[@]}" | med); c=$(printf '%s\n' "${lw[@]}" | med); q=$(printf '%s\n' "${lq[@]}" | med)
  printf '%-44s replay -q %8.0f ms | history %s 8 %8.0f ms (%.2fx) | history --reads %8.0f ms (%.2fx)\n' \
    "$1 ($2)" "$mr" "$3" "$a" "$(awk "BEGIN{print $a / $mr}")" "$b" "$(awk "BEGIN{print $b / $mr}")"
  printf '%-44s replay -q %8.0f ms | last-write from the end: the search %8.0f ms (%.2fx) | the whole inspect process (replays to the end first) %8.0f ms (%.2fx)\n' \
    "$1 ($2)" "$mr" "$q" "$(awk "BEGIN{print $q / $mr}")" "$c" "$(awk "BEGIN{print $c / $mr}")"
}
history_before_after() { # the stepping oracle vs the engine on a short recording
  local rec=$tmp/hshort; record "$rec" "workload=compute iters=20000"
  t0=$(now); REVIRT_HISTORY_NATIVE=0 $R inspect "$rec" -c "history cur_task 8 start end" >/dev/null 2>&1; t1=$(now)
  t2=$(now); $R inspect "$rec" -c "history cur_task 8 start end" >/dev/null 2>&1; t3=$(now)
  printf 'before/after, compute iters=20000, history cur_task 8 start end: stepping %.0f ms, native %.0f ms\n' \
    "$(awk "BEGIN{print ($t1 - $t0) * 1000}")" "$(awk "BEGIN{print ($t3 - $t2) * 1000}")"
}
ROWS=${ROWS:-watch rwatch awatch compute ring0 race before history}
row() { [[ " $ROWS " == *" $1 "* ]]; }
echo "medians of $ROUNDS, target <= 1.5x replay"
for w in watch rwatch awatch; do
  if row $w; then bench_watch compute "workload=compute iters=$ITERS" cur_task $w; fi
done
if row compute; then bench compute "workload=compute iters=$ITERS" power_off wl_compute; fi
if row ring0; then bench ring0 "workload=ring0 iters=20000" power_off ring0_main; fi
if row race; then bench race "workload=race iters=200000 exits=16" task_exit kmain; fi
if row history; then bench_history compute "workload=compute iters=$ITERS" cur_task; history_before_after; fi
row before || exit 0
# Before/after: the stepping path on a recording short enough for it.
rec=$tmp/short; record "$rec" "workload=compute iters=20000"
serve "$rec" "$tmp/srv-old" "REVIRT_GDB_NATIVE=0"
old=$(timed_gdb "$port" "break power_off" "continue" "" | grep '^MS' | cut -d' ' -f2)
kill "${pids[-1]}" 2>/dev/null || true
serve "$rec" "$tmp/srv-new"
new=$(timed_gdb "$port" "break power_off" "continue" "" | grep '^MS' | cut -d' ' -f2)
printf 'before/after, compute iters=20000, break power_off + continue: stepping %.0f ms, native %.0f ms\n' "$old" "$new"
