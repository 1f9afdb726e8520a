#!/usr/bin/env bash
# The SDK's third-party programs (guests/programs: zlib, Lua) in the QEMU
# comparison: QEMU TCG plain / rr=record / rr=replay against revirt run /
# record / replay of the same image and command line, interleaved, side by
# side in one run; the outputs must be identical. Prints a table and writes
# target/bench/sdk.json. See docs/performance.md ("SDK programs").
#
#   bash scripts/bench-sdk.sh          # REPS=3, median reported
# Figures are ratios from one run on a shared machine; nothing here asserts.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
make -s -C guests/programs >/dev/null
if ! command -v qemu-system-x86_64 >/dev/null; then
    echo "bench-sdk: installing qemu-system-x86 (for the QEMU comparison)" >&2
    { apt-get update -q && apt-get install -y -q qemu-system-x86; } >/dev/null 2>&1 ||
        { echo "bench-sdk: qemu-system-x86_64 is needed" >&2; exit 1; }
fi
mkdir -p target/bench
exec python3 - <<'PY'
import json, os, shutil, statistics, subprocess, sys, time

R = os.path.abspath("target/release/revirt")
P = os.path.abspath("guests/programs/out")
OUT = os.path.abspath("target/bench")
REPS = int(os.environ.get("REPS", "3"))
QEMU = shutil.which("qemu-system-x86_64")
LUA = ("-e local t = {} for i = 1, 200000 do t[i] = (i * 7919) % 100003 end table.sort(t) "
       "local s = 0 for i = 1, #t, 7 do s = s + t[i] end print('lua: sum', s, #t)")
CASES = [("zlib 4 MB level 6", "zdemo.img", "gen=4000000 level=6"),
         ("Lua 5.4 sort 200k", "luademo.img", LUA)]

def sh(cmd, ok=(0,)):
    t = time.perf_counter()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t
    if p.returncode not in ok:
        sys.exit(f"bench-sdk: {cmd[:4]} exited {p.returncode}\n{p.stdout[-1000:]}\n{p.stderr[-1000:]}")
    return dt, p.stdout

res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "reps": REPS,
       "qemu": subprocess.run([QEMU, "--version"], stdout=subprocess.PIPE, text=True).stdout.splitlines()[0], "cases": []}
for label, img, cl in CASES:
    img = os.path.join(P, img)
    q = [QEMU, "-kernel", img, "-append", cl, "-m", "64M", "-display", "none", "-serial", "stdio",
         "-monitor", "none", "-net", "none", "-device", "isa-debug-exit,iobase=0x550,iosize=4"]
    rrf, rec = os.path.join(OUT, "sdk-qemu.rr"), os.path.join(OUT, "sdk-rec")
    t = {k: [] for k in ["qemu", "qemu_record", "qemu_replay", "run", "record", "replay"]}
    outs = set()
    print(f"== {label}", file=sys.stderr, flush=True)
    for _ in range(REPS):
        # isa-debug-exit: the guest's status 0 becomes QEMU's 1.
        dt, o = sh(q, ok=(1,)); t["qemu"].append(dt); outs.add(o)
        dt, o = sh(q + ["-icount", f"shift=auto,rr=record,rrfile={rrf}"], ok=(1,)); t["qemu_record"].append(dt); outs.add(o)
        dt, o = sh(q + ["-icount", f"shift=auto,rr=replay,rrfile={rrf}"], ok=(1,)); t["qemu_replay"].append(dt); outs.add(o)
        dt, o = sh([R, "run", img, f"--cmdline={cl}"]); t["run"].append(dt); outs.add(o)
        shutil.rmtree(rec, ignore_errors=True)
        dt, o = sh([R, "record", img, f"--cmdline={cl}", "-o", rec]); t["record"].append(dt); outs.add(o)
        dt, o = sh([R, "replay", rec]); t["replay"].append(dt); outs.add(o)
    m = {k: statistics.median(v) for k, v in t.items()}
    m.update(case=label, cmdline=cl, same_output=len(outs) == 1, output=sorted(outs)[0].strip().splitlines()[-1],
             qemu_record_over_revirt_record=m["qemu_record"] / m["record"],
             qemu_replay_over_revirt_replay=m["qemu_replay"] / m["replay"],
             qemu_over_revirt_run=m["qemu"] / m["run"])
    res["cases"].append(m)
json.dump(res, open(os.path.join(OUT, "sdk.json"), "w"), indent=1)

print(f"\nSDK programs, QEMU TCG vs revirt (median of {REPS}, wall seconds; {res['qemu']}; {res['date']})")
print(f"| program | QEMU plain / revirt run | QEMU rr=record / revirt record | QEMU rr=replay / revirt replay | same output |")
print("|---|---|---|---|---|")
for m in res["cases"]:
    print(f"| {m['case']} | {m['qemu']:.2f} / {m['run']:.2f} s = {m['qemu_over_revirt_run']:.1f}x"
          f" | {m['qemu_record']:.2f} / {m['record']:.2f} s = {m['qemu_record_over_revirt_record']:.1f}x"
          f" | {m['qemu_replay']:.2f} / {m['replay']:.2f} s = {m['qemu_replay_over_revirt_replay']:.1f}x"
          f" | {m['same_output']} (`{m['output']}`) |")
PY
