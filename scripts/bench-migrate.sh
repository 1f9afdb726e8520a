#!/usr/bin/env bash
# Live-migration figures: downtime and total time against guest memory size
# and dirty rate, source and destination on this machine over TCP loopback.
# Usage: scripts/bench-migrate.sh [REPS]   (median of REPS runs, default 3)
#   RECORD=1: the source records (`revirt record --control`) and the
#   destination goes on recording (`receive -o`): the downtime then includes
#   the recorder's checkpoint in flight, log flush and dirty-log sync.
#   MEMS="64M" PAGES="256": only those sizes (default: 64M 256M 1G x 1 256 1024 4096).
# Prints a table and writes target/bench/migrate.json.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-3}
cargo build --release -q
R=$PWD/target/release/revirt
IMG=$PWD/guests/demo/out/vm.img
OUT=$PWD/target/bench
mkdir -p "$OUT"
T=$(mktemp -d)
trap 'rm -rf "$T"; kill $(jobs -p) 2>/dev/null || true' EXIT

one() { # mem pages -> one JSON summary line (or nothing on failure)
  local mem=$1 pages=$2 port
  rm -rf "$T"/*
  local rec_src=() rec_dst=()
  if [[ -n "${RECORD:-}" ]]; then rec_src=(-o "$T/srec"); rec_dst=(-o "$T/drec"); fi
  "$R" receive --listen 127.0.0.1:0 "${rec_dst[@]}" >"$T/dst.out" 2>"$T/dst.err" &
  local dpid=$!
  for _ in $(seq 100); do grep -q "waiting for a VM on" "$T/dst.err" 2>/dev/null && break; sleep 0.05; done
  local addr; addr=$(sed -n 's/.*waiting for a VM on //p' "$T/dst.err" | head -1)
  local verb=run; [[ -n "${RECORD:-}" ]] && verb=record
  "$R" $verb "$IMG" "${rec_src[@]}" --mem "$mem" --cmdline "workload=churn iters=400 pages=$pages hz=100" \
    --control "$T/ctl.sock" </dev/null >"$T/src.out" 2>"$T/src.err" &
  local spid=$!
  for _ in $(seq 200); do grep -q "churn: round 30" "$T/src.out" 2>/dev/null && break; sleep 0.05; done
  local j; j=$("$R" migrate "$T/ctl.sock" --to "$addr" --json 2>"$T/mig.err" | tail -1) || true
  wait "$spid" || true
  wait "$dpid" || true
  # The destination's resume: from its final state arriving (and from the
  # source's commit) to the guest going to its run loop there.
  local res; res=$(sed -n 's/.*it ran here \([0-9.]*\) ms after its final state arrived, \([0-9.]*\) ms after.*/\1 \2/p' "$T/dst.err")
  [[ -n "$j" ]] && python3 -c 'import json,sys
j=json.loads(sys.argv[1]); a=sys.argv[2].split()
if len(a) == 2: j["dst_resume_ms"], j["dst_after_commit_ms"] = float(a[0]), float(a[1])
print(json.dumps(j))' "$j" "$res"
  grep -q "churn: rounds=400" "$T/dst.out" || echo "bench-migrate: destination did not finish ($mem, $pages)" >&2
  if [[ -n "${RECORD:-}" ]] && ! "$R" replay -q "$T/drec" >/dev/null 2>&1; then echo "bench-migrate: the moved recording does not replay ($mem, $pages)" >&2; fi
}

echo "revirt live migration, $(date -u +%F), $(nproc) CPUs, median of $REPS; guest: churn at 100 Hz${RECORD:+, recorded}" >&2
echo "downtime = guest paused at the source until its commit is sent; dst_resume = destination, final state arrived -> guest to its run loop; after_commit = destination, commit arrived -> guest to its run loop" >&2
printf '%-6s %-14s %-12s %-14s %-15s %-10s %-8s %-8s %-10s\n' mem dirty_pages/s downtime_ms dst_resume_ms after_commit_ms total_ms rounds MiB_sent throttle%
results=()
for mem in ${MEMS:-64M 256M 1G}; do
  for pages in ${PAGES:-1 256 1024 4096}; do
    runs=()
    for _ in $(seq "$REPS"); do
      j=$(one "$mem" "$pages")
      [[ -n "$j" ]] && runs+=("$j")
    done
    line=$(printf '%s\n' "${runs[@]}" | python3 -c '
import json,sys,statistics as st
rs=[json.loads(l) for l in sys.stdin if l.strip()]
if not rs: print("{}"); sys.exit()
m=lambda k: st.median(r[k] for r in rs)
d=lambda k: st.median(r[k] for r in rs) if all(k in r for r in rs) else None
print(json.dumps({"downtime_ms":m("downtime_ms"),"dst_resume_ms":d("dst_resume_ms"),"dst_after_commit_ms":d("dst_after_commit_ms"),"total_ms":m("total_ms"),"rounds":m("rounds"),"mib":m("bytes")/2**20,"throttle":max(r["max_throttle"] for r in rs),"n":len(rs)}))')
    results+=("{\"mem\":\"$mem\",\"pages_per_tick\":$pages,\"r\":$line}")
    python3 - "$mem" "$pages" "$line" <<'PY'
import json,sys
mem,pages,r=sys.argv[1],int(sys.argv[2]),json.loads(sys.argv[3])
if not r: print(f"{mem:<6} {pages*100:<14} failed"); sys.exit()
f3=lambda x: "-" if x is None else f"{x:.3f}"
print(f"{mem:<6} {pages*100:<14} {r['downtime_ms']:<12.2f} {f3(r['dst_resume_ms']):<14} {f3(r['dst_after_commit_ms']):<15} {r['total_ms']:<10.0f} {r['rounds']:<8.0f} {r['mib']:<8.1f} {r['throttle']:<10}")
PY
  done
done
printf '[%s]\n' "$(IFS=,; echo "${results[*]}")" >"$OUT/migrate.json"
echo "written $OUT/migrate.json" >&2
