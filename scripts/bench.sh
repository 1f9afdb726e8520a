#!/usr/bin/env bash
# Benchmarks: revirt record/replay/seek/checkpoint costs and QEMU TCG
# record/replay of the same guest, measured side by side in one run.
# Prints a table and writes target/bench/bench.json. See docs/performance.md.
#
#   bash scripts/bench.sh              # REPS=3 repetitions, median reported
#   REPS=5 bash scripts/bench.sh
#   NO_QEMU=1 bash scripts/bench.sh    # skip the QEMU comparison
#
# Figures are ratios from one run on a noisy machine; nothing here asserts.
# Run it on an otherwise idle machine (a parallel `cargo test` doubles figures).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q
if [ -z "${NO_QEMU:-}" ] && ! command -v qemu-system-x86_64 >/dev/null; then
    echo "bench: installing qemu-system-x86 (for the QEMU comparison)" >&2
    { apt-get update -q && apt-get install -y -q qemu-system-x86; } >/dev/null 2>&1 \
        || echo "bench: could not install qemu-system-x86; the QEMU rows will be missing" >&2
fi

export BENCH_OUT=target/bench
rm -rf "$BENCH_OUT" && mkdir -p "$BENCH_OUT"

exec python3 - "$@" <<'PY'
import json, os, platform, re, shutil, statistics, struct, subprocess, sys, time

R = os.path.abspath("target/release/revirt")
G = os.path.abspath("guests/demo/out/vm.img")
OUT = os.path.abspath(os.environ["BENCH_OUT"])
REPS = int(os.environ.get("REPS", "3"))
QEMU = None if os.environ.get("NO_QEMU") else shutil.which("qemu-system-x86_64")
MEM = 64 << 20
res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "reps": REPS}

class Proc:
    pass

def sh(cmd, ok=(0,), stdin=subprocess.DEVNULL):
    """Runs cmd; returns (wall seconds, result). result.cpu = user+sys CPU seconds of
    the process (guest time included), less sensitive than wall time to other load."""
    t = time.perf_counter()
    child = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = child.communicate()
    dt = time.perf_counter() - t
    p = Proc(); p.returncode = child.returncode; p.stdout = out; p.stderr = err
    if p.returncode not in ok:
        sys.exit(f"bench: {' '.join(cmd)} exited {p.returncode}\n{out[-2000:]}\n{err[-2000:]}")
    p.cpu = CPU.pop()
    return dt, p

# CPU time per child: subprocess reaps with waitpid; wrap it to use wait4.
_orig_wait = subprocess.Popen._try_wait
CPU = []
def _try_wait(self, wait_flags):
    pid, sts, ru = os.wait4(self.pid, wait_flags)
    if pid == self.pid:
        CPU.append(ru.ru_utime + ru.ru_stime)
    return (pid, sts)
subprocess.Popen._try_wait = _try_wait

def med(xs): return statistics.median(xs)
def p95(xs):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]

LASTCPU = [0.0]
def rec_dir(name): return os.path.join(OUT, name)

def record(name, cmdline, clock="exit", ckpt="1s", mem=None):
    d = rec_dir(name); shutil.rmtree(d, ignore_errors=True)
    cmd = [R, "record", G, "--cmdline", cmdline, "-o", d, "--clock", clock, "--checkpoint-every", ckpt]
    if mem: cmd += ["--mem", mem]
    dt, p = sh(cmd)
    LASTCPU[0] = p.cpu
    m = re.search(r"(\d+) exits, (\d+) events \((\d+) bytes of log\), (\d+) checkpoints \((\d+) bytes\)", p.stderr)
    s = dict(zip(["exits", "events", "log_bytes", "checkpoints", "checkpoint_bytes"], map(int, m.groups()))) if m else {}
    return dt, s, p.stdout

def run(cmdline, mem=None):
    cmd = [R, "run", G, "--cmdline", cmdline] + (["--mem", mem] if mem else [])
    return sh(cmd)

def replay(name, *extra):
    return sh([R, "replay", "-q", rec_dir(name), *extra])

def log_stats(name):
    """Sum of the chunk headers: events, raw (decompressed) bytes, compressed payload bytes."""
    b = open(os.path.join(rec_dir(name), "events.log"), "rb").read()
    assert b[:8] == b"RVLOG001"
    off, ev, raw, comp, chunks = 8, 0, 0, 0, 0
    while off + 28 <= len(b) and b[off:off + 4] == b"CHNK":
        _seq, _first, n, rl, cl = struct.unpack_from("<IQIII", b, off + 4)
        ev += n; raw += rl; comp += cl; chunks += 1
        off += 28 + cl + 32
    return {"events": ev, "raw_bytes": raw, "payload_bytes": comp, "file_bytes": len(b), "chunks": chunks}

def ckpt_headers(name):
    d = os.path.join(rec_dir(name), "checkpoints"); out = []
    for f in sorted(os.listdir(d)):
        b = open(os.path.join(d, f), "rb").read()
        assert b[:8] == b"RVCKPT01"
        (hl,) = struct.unpack_from("<Q", b, 8)
        h = json.loads(b[16:16 + hl])
        out.append({"id": h["id"], "exits": h["exits"], "bytes": len(b),
                    "pages": sum(c for _, c in h.get("pages", []))})
    return out

def section(t): print(f"\n== {t}", file=sys.stderr, flush=True)

# ---------------------------------------------------------------- record overhead
section("record overhead / replay speed (exit clock)")
COMPUTE = "workload=compute iters=200000000"
RACE = "workload=race exits=16 iters=200000"
STEP = "workload=compute iters=300"
rows = []
for label, cl, clock in [("compute (exit)", COMPUTE, "exit"), ("race exits=16 (exit)", RACE, "exit"),
                         ("compute iters=300 (step)", STEP, "step"), ("compute iters=300 (pmu-sim)", STEP, "pmu-sim")]:
    tr, tc, tp, cr, cc, cp, st = [], [], [], [], [], [], None
    for i in range(REPS):
        dt, p = run(cl); tr.append(dt); cr.append(p.cpu)
        name = f"ovh-{clock}-{len(rows)}"
        dt, st, _ = record(name, cl, clock=clock)
        tc.append(dt); cc.append(LASTCPU[0])
        dt, p = replay(name); tp.append(dt); cp.append(p.cpu)
    r = {"workload": label, "cmdline": cl, "clock": clock, "run_s": med(tr), "record_s": med(tc),
         "replay_s": med(tp), "record_over_run": med(tc) / med(tr), "replay_over_record": med(tp) / med(tc),
         "run_cpu_s": med(cr), "record_cpu_s": med(cc), "replay_cpu_s": med(cp),
         "record_over_run_cpu": med(cc) / med(cr), "replay_over_record_cpu": med(cp) / med(cc),
         "exits": st.get("exits"), "events": st.get("events")}
    rows.append(r)
    print(f"  {label:30} run {r['run_s']:.3f}s record {r['record_s']:.3f}s replay {r['replay_s']:.3f}s", file=sys.stderr)
res["overhead"] = rows

# ---------------------------------------------------------------- log size
section("log size")
ls = log_stats("ovh-exit-1")
rec_s = rows[1]["record_s"]
res["log"] = dict(ls, workload=RACE, record_s=rec_s,
                  bytes_per_event_compressed=ls["file_bytes"] / max(1, ls["events"]),
                  bytes_per_event_raw=ls["raw_bytes"] / max(1, ls["events"]),
                  bytes_per_s_compressed=ls["file_bytes"] / rec_s, bytes_per_s_raw=ls["raw_bytes"] / rec_s)
print(f"  {res['log']}", file=sys.stderr)

# ---------------------------------------------------------------- checkpoints
section("checkpoint cost vs dirty pages")
ck = []
for pages in [64, 1024, 4096, 12288]:
    cl = f"workload=dirty iters=30 pages={pages}"
    t0s, t1s, c0s, c1s, hs = [], [], [], [], None
    for i in range(REPS):
        t0s.append(record(f"ck0-{pages}", cl, ckpt="0")[0]); c0s.append(LASTCPU[0])
        dt, st, _ = record(f"ck-{pages}", cl, ckpt="10ms"); t1s.append(dt); c1s.append(LASTCPU[0])
        hs = ckpt_headers(f"ck-{pages}")
    n = len(hs) - 1                      # incremental checkpoints (0 is the full one)
    inc = [h for h in hs if h["id"] > 0]
    per = (med(t1s) - med(t0s)) / max(1, n) * 1000
    per_cpu = (med(c1s) - med(c0s)) / max(1, n) * 1000
    row = {"pages_written": pages, "incremental_checkpoints": n, "record_no_ckpt_s": med(t0s), "record_10ms_s": med(t1s),
           "record_no_ckpt_cpu_s": med(c0s), "record_10ms_cpu_s": med(c1s), "cpu_ms_per_checkpoint": per_cpu,
           "ms_per_checkpoint": per, "median_dirty_pages": med([h["pages"] for h in inc]) if inc else 0,
           "median_checkpoint_bytes": med([h["bytes"] for h in inc]) if inc else 0,
           "total_checkpoint_bytes": sum(h["bytes"] for h in hs), "guest_ram": MEM}
    row["ms_per_1000_dirty_pages"] = per / max(1, row["median_dirty_pages"]) * 1000
    row["cpu_ms_per_1000_dirty_pages"] = per_cpu / max(1, row["median_dirty_pages"]) * 1000
    ck.append(row)
    print(f"  {row}", file=sys.stderr)
res["checkpoints"] = ck
# the full checkpoint 0: record a tiny run with 64 MiB vs 512 MiB of RAM
full = {}
for mem in ["64M", "512M"]:
    ws, cs = [], []
    for _ in range(REPS):
        ws.append(record(f"full-{mem}", "workload=compute iters=1000", ckpt="0", mem=mem)[0]); cs.append(LASTCPU[0])
    full[mem] = med(ws); full[mem + "_cpu"] = med(cs)
    full[mem + "_ckpt0_bytes"] = os.path.getsize(os.path.join(rec_dir(f"full-{mem}"), "checkpoints", "000000.ckpt"))
full["ms_per_1000_pages"] = (full["512M"] - full["64M"]) * 1000 / ((512 - 64) * 256 / 1000)
full["cpu_ms_per_1000_pages"] = (full["512M_cpu"] - full["64M_cpu"]) * 1000 / ((512 - 64) * 256 / 1000)
res["full_checkpoint"] = full
print(f"  full checkpoint 0: {full}", file=sys.stderr)

# ---------------------------------------------------------------- time travel
section("time travel (seek = restore nearest checkpoint + roll forward)")
dt, st, _ = record("long", RACE, ckpt="100ms")
E = st["exits"]
fwd = med([replay("long")[0] for _ in range(REPS)])
seeks = {}
for frac in [0.1, 0.3, 0.5, 0.7, 0.9]:
    ts = []
    for k in range(REPS + 2):
        target = int(E * frac) + 37 * k
        ts.append(replay("long", "--to", str(target))[0])
    seeks[str(frac)] = {"median_s": med(ts), "p95_s": p95(ts)}
allseek = [v["median_s"] for v in seeks.values()]
late = int(E * 0.9)
from_start = med([replay("long", "--to", str(late), "--from-checkpoint", "0")[0] for _ in range(REPS)])
from_near = med([replay("long", "--to", str(late))[0] for _ in range(REPS)])
noop = med([sh([R, "replay", "--help"])[0] for _ in range(REPS)])
res["time_travel"] = {"recording_exits": E, "recording_checkpoints": st["checkpoints"], "record_s": dt,
                      "forward_replay_s": fwd, "seek_by_depth": seeks,
                      "seek_median_s": med(allseek), "seek_p95_s": p95([v["p95_s"] for v in seeks.values()]),
                      "late_point_exit": late, "to_late_from_start_s": from_start, "to_late_from_nearest_s": from_near,
                      "process_start_s": noop}
print(f"  {res['time_travel']}", file=sys.stderr)

# reverse-stepi through the GDB stub (in one process): gdb batch with 0 and with
# NRS reverse-stepi from exit E*frac; the difference / NRS is one reverse-stepi.
GDB = shutil.which("gdb")
NRS = 5
def gdb_batch(port, n):
    cmd = [GDB, "-nx", "-batch", "-ex", "set architecture i386:x86-64", "-ex", "set pagination off",
           "-ex", f"target remote 127.0.0.1:{port}"] + ["-ex", "reverse-stepi"] * n + ["-ex", "disconnect", G]
    return sh(cmd, ok=(0, 1))[0]
if GDB:
    rs = {}
    for frac in [0.3, 0.9]:
        srv = subprocess.Popen([R, "gdb", rec_dir("long"), "--port", "0", "--at", str(int(E * frac))],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        for line in srv.stderr:
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if m: port = int(m.group(1)); break
        per = []
        for _ in range(REPS):
            t0 = gdb_batch(port, 0); t1 = gdb_batch(port, NRS)
            per.append((t1 - t0) / NRS)
        srv.kill(); srv.wait(); CPU.pop() if CPU else None
        rs[str(frac)] = {"median_s": med(per), "max_s": max(per)}
    res["time_travel"]["gdb_reverse_stepi"] = rs
    print(f"  gdb reverse-stepi: {rs}", file=sys.stderr)

# ---------------------------------------------------------------- QEMU
res["qemu"] = []
for QITERS in [int(x) for x in os.environ.get("QEMU_ITERS", "20000000,200000000").split(",")] if QEMU else []:
    QCL = f"workload=compute iters={QITERS}"
    section(f"QEMU TCG rr vs revirt, {QCL}")
    qbase = [QEMU, "-kernel", G, "-append", QCL, "-m", "64M", "-display", "none", "-serial", "stdio",
             "-monitor", "none", "-net", "none", "-device", "isa-debug-exit,iobase=0x550,iosize=4"]
    rrf = os.path.join(OUT, "qemu.rr")
    q = {"plain": [], "record": [], "replay": [], "revirt_run": [], "revirt_record": [], "revirt_replay": []}
    qc = {k: [] for k in q}
    def add(k, dt, cpu): q[k].append(dt); qc[k].append(cpu)
    outs = set()
    for i in range(REPS):
        # isa-debug-exit: status v becomes (v << 1) | 1, so the guest's 0 is 1.
        dt, p = sh(qbase, ok=(1,)); add("plain", dt, p.cpu); outs.add(p.stdout.strip())
        dt, p = sh(qbase + ["-icount", f"shift=auto,rr=record,rrfile={rrf}"], ok=(1,)); add("record", dt, p.cpu); outs.add(p.stdout.strip())
        dt, p = sh(qbase + ["-icount", f"shift=auto,rr=replay,rrfile={rrf}"], ok=(1,)); add("replay", dt, p.cpu); outs.add(p.stdout.strip())
        dt, p = run(QCL); add("revirt_run", dt, p.cpu); outs.add(p.stdout.strip())
        dt, _, o = record("qcmp", QCL); add("revirt_record", dt, LASTCPU[0]); outs.add(o.strip())
        dt, p = sh([R, "replay", rec_dir("qcmp")]); add("revirt_replay", dt, p.cpu); outs.add(p.stdout.strip())
    qm = {k: med(v) for k, v in q.items()}
    qm.update({k + "_cpu": med(v) for k, v in qc.items()})
    qm.update(cmdline=QCL, qemu=subprocess.run([QEMU, "--version"], stdout=subprocess.PIPE, text=True).stdout.splitlines()[0],
              rr_file_bytes=os.path.getsize(rrf), same_output=len(outs) == 1, output=sorted(outs)[0].splitlines()[-1],
              qemu_record_over_revirt_record=qm["record"] / qm["revirt_record"],
              qemu_replay_over_revirt_replay=qm["replay"] / qm["revirt_replay"],
              qemu_record_over_revirt_record_cpu=qm["record_cpu"] / qm["revirt_record_cpu"],
              qemu_replay_over_revirt_replay_cpu=qm["replay_cpu"] / qm["revirt_replay_cpu"])
    res["qemu"].append(qm)
    print(f"  {qm}", file=sys.stderr)

json.dump(res, open(os.path.join(OUT, "bench.json"), "w"), indent=1)

# ---------------------------------------------------------------- table
def f(x, d=2): return f"{x:.{d}f}"
T = []
for r in res["overhead"]:
    T.append((f"record/run, {r['workload']}", f"wall {f(r['record_s'],3)}/{f(r['run_s'],3)} s = {f(r['record_over_run'])}x; cpu {f(r['record_over_run_cpu'])}x",
              "<= 1.05x (exit-driven)" if r["clock"] == "exit" else "-"))
for r in res["overhead"]:
    T.append((f"replay/record, {r['workload']}", f"wall {f(r['replay_s'],3)}/{f(r['record_s'],3)} s = {f(r['replay_over_record'])}x; cpu {f(r['replay_over_record_cpu'])}x", "<= 1.0x"))
L = res["log"]
T.append(("log bytes/event (compressed file / raw)", f"{f(L['bytes_per_event_compressed'])} / {f(L['bytes_per_event_raw'])} ({L['events']} events)", "<= 16"))
T.append(("log bytes/s of guest run (compressed / raw)", f"{L['bytes_per_s_compressed']:.0f} / {L['bytes_per_s_raw']:.0f}", "-"))
for c in res["checkpoints"]:
    T.append((f"checkpoint, dirty pages={c['median_dirty_pages']:.0f}", f"wall {f(c['ms_per_checkpoint'],1)} ms, cpu {f(c['cpu_ms_per_checkpoint'],1)} ms "
              f"(cpu {f(c['cpu_ms_per_1000_dirty_pages'],1)} ms/1000 pages; {c['incremental_checkpoints']} ckpts, {c['total_checkpoint_bytes']/MEM:.3f}x RAM)", "<= 5 ms/1000 pages"))
T.append(("full checkpoint 0 (slope 64M->512M)", f"wall {f(full['ms_per_1000_pages'],1)}, cpu {f(full['cpu_ms_per_1000_pages'],1)} ms/1000 pages", "-"))
tt = res["time_travel"]
T.append(("seek --to EXITS (median / p95 over depths)", f"{f(tt['seek_median_s']*1000,0)} / {f(tt['seek_p95_s']*1000,0)} ms", "reverse-stepi <= 50 ms median"))
for k, v in tt.get("gdb_reverse_stepi", {}).items():
    T.append((f"gdb reverse-stepi at {float(k):.0%} (median / max of {REPS}x{NRS})", f"{f(v['median_s']*1000,0)} / {f(v['max_s']*1000,0)} ms", "<= 50 ms median"))
T.append(("seek to 90%: from nearest ckpt / from start / full replay", f"{f(tt['to_late_from_nearest_s'],3)} / {f(tt['to_late_from_start_s'],3)} / {f(tt['forward_replay_s'],3)} s", "-"))
for qm in res.get("qemu", []):
    QCL = qm["cmdline"]
    T.append((f"QEMU rr=record / revirt record ({QCL})", f"wall {f(qm['record'],3)}/{f(qm['revirt_record'],3)} s = {f(qm['qemu_record_over_revirt_record'],1)}x; cpu {f(qm['qemu_record_over_revirt_record_cpu'],1)}x", ">= 20x"))
    T.append((f"QEMU rr=replay / revirt replay", f"wall {f(qm['replay'],3)}/{f(qm['revirt_replay'],3)} s = {f(qm['qemu_replay_over_revirt_replay'],1)}x; cpu {f(qm['qemu_replay_over_revirt_replay_cpu'],1)}x", "-"))
    T.append(("QEMU plain TCG / revirt run", f"{f(qm['plain'],3)} / {f(qm['revirt_run'],3)} s; same output: {qm['same_output']}", "-"))
w = max(len(a) for a, _, _ in T); v = max(len(b) for _, b, _ in T)
print(f"\nrevirt bench, {res['date']}, median of {REPS}; JSON: {os.path.relpath(OUT)}/bench.json")
print(f"| {'what':{w}} | {'measured':{v}} | target |")
print(f"|{'-'*(w+2)}|{'-'*(v+2)}|---|")
for a, b, c in T: print(f"| {a:{w}} | {b:{v}} | {c} |")
PY
