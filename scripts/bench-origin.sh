#!/usr/bin/env bash
# Time of `origin` on the vuln exploit recording (target: <= 2 s): the
# 8-byte return-address slot at serve's `ret`, back to the serial bytes.
#   bash scripts/bench-origin.sh [ROUNDS]
# Records the exploit (guests/demo/README.md) unless REC=dir is given,
# finds the point of serve's `ret` with the real gdb (break, continue,
# monitor where), then runs `revirt inspect -c 'origin $rsp:8 at POINT'`
# ROUNDS times and prints wall-clock times next to the query's own figure,
# with `history $rsp 8` (all writes since the start) and `last-write` of the
# same slot (one byte's writer, no data flow) for comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
cargo build --release --quiet
R=./target/release/revirt; G=guests/demo/out/vm.img
tmp=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
REC=${REC:-}
if [ -z "$REC" ]; then
  REC=$tmp/vuln
  printf '%056d\000\000\040\000\000\000\000\000\n' 0 | $R record $G --cmdline workload=vuln -o "$REC" >/dev/null 2>&1 || true
fi
RET=$(objdump -d --no-show-raw-insn $G | awk '/<serve>:/,/^$/' | grep -E '\sret' | tail -1 | awk '{print $1}' | tr -d ':')
# A native-speed stop does not know its branch count until asked (monitor
# origin makes it exact); the stepping continue reports the exact point.
REVIRT_GDB_NATIVE=0 $R gdb "$REC" --port 0 2>"$tmp/srv" &
pid=$!
for _ in $(seq 600); do port=$(grep -o "listening on 127.0.0.1:[0-9]*" "$tmp/srv" | head -1 | cut -d: -f2 || true); [ -n "$port" ] && break; sleep 0.1; done
POINT=$(gdb -nx -batch -ex "set architecture i386:x86-64" -ex "target remote 127.0.0.1:$port" -ex "break *0x$RET" -ex continue \
  -ex "monitor where" $G 2>&1 | sed -n 's/^exit \([0-9]*\) + \([0-9]*\) branches @ rip \(0x[0-9a-f]*\).*/\1:\2:\3/p' | head -1)
kill "$pid"; pid=
[ -n "$POINT" ] || { echo "could not find serve's ret (0x$RET)" >&2; exit 1; }
echo "recording: $REC; serve's ret (0x$RET) at $POINT"
ms() { date +%s%N; }
for r in $(seq "$ROUNDS"); do
  t0=$(ms); out=$($R inspect "$REC" -c "origin \$rsp:8 at $POINT"); t1=$(ms)
  grep -q "serial input: event #[0-9]* bytes 56..64" <<<"$out" || { echo "origin did not reach the serial bytes:" >&2; echo "$out" >&2; exit 1; }
  inner=$(grep -o '[0-9]* single-stepped from exit [0-9]* in [0-9]* window(s), [0-9]* ms' <<<"$out")
  t2=$(ms); $R inspect "$REC" -c "seek $POINT; history \$rsp 8" >/dev/null; t3=$(ms)
  t4=$(ms); $R inspect "$REC" -c "seek $POINT; last-write \$rsp 8" >/dev/null; t5=$(ms)
  printf 'round %d: origin %5d ms wall (%s) | history since start %5d ms | last-write %5d ms\n' "$r" \
    $(((t1 - t0) / 1000000)) "$inner" $(((t3 - t2) / 1000000)) $(((t5 - t4) / 1000000))
done
echo "target: origin <= 2000 ms"
