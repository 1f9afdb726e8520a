#!/usr/bin/env bash
# Benchmarks: revirt record/replay/checkpoint/seek costs, the same against a
# "before" binary (main at 3846335, before issue 17's fixes), and QEMU TCG
# record/replay of the same guest, all measured side by side in one run.
# Prints ONE table (what | before | now | target | verdict) and writes
# target/bench/bench.json. docs/performance.md is written from its output.
#
#   bash scripts/bench.sh                  # REPS=3 repetitions, median reported
#   REPS=5 bash scripts/bench.sh
#   NO_QEMU=1 bash scripts/bench.sh        # skip the QEMU comparison
#   NO_BEFORE=1 bash scripts/bench.sh      # skip the before column
#   BEFORE_BIN=/path/to/revirt bash scripts/bench.sh   # reuse a built "before"
#   NO_MIGRATE=1 bash scripts/bench.sh     # skip the recorded-VM migration rows
#   LONG_FROM=DIR bash scripts/bench.sh    # quote long.json / seek-compare.json from DIR
#                                          # (default target/bench: where bench-long.sh writes them)
#   ONLY=ckpt,mem bash scripts/bench.sh    # only these sections (record log ckpt mem tt qemu
#                                          # migrate long; for iterating, not for the report)
# It also runs RECORD=1 scripts/bench-migrate.sh (64M, 25,600 and 102,400
# dirty pages/s) and quotes target/bench/long.json from scripts/bench-long.sh
# (a 10-minute recording, run on its own beforehand) when it is there.
#
# The before binary is built from commit $BEFORE_REV (default 3846335) into
# /tmp/revirt-before-$BEFORE_REV (git archive + cargo build, a few minutes once).
# Figures are ratios from one run on a noisy machine; nothing here asserts.
set -euo pipefail
cd "$(dirname "$0")/.."
only() { [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",$1,"* ]]; }

cargo build --release -q
if [ -z "${NO_QEMU:-}" ] && only qemu && ! command -v qemu-system-x86_64 >/dev/null; then
    echo "bench: installing qemu-system-x86 (for the QEMU comparison)" >&2
    { apt-get update -q && apt-get install -y -q qemu-system-x86; } >/dev/null 2>&1 \
        || echo "bench: could not install qemu-system-x86; the QEMU rows will be missing" >&2
fi
BEFORE_REV=${BEFORE_REV:-3846335}
if [ -z "${NO_BEFORE:-}" ] && [ -z "${BEFORE_BIN:-}" ]; then
    src=/tmp/revirt-before-$BEFORE_REV
    if [ ! -x "$src/target/release/revirt" ]; then
        echo "bench: building the before binary from $BEFORE_REV in $src" >&2
        mkdir -p "$src" && git archive "$BEFORE_REV" | tar -x -C "$src"
        (cd "$src" && cargo build --release -q)
    fi
    export BEFORE_BIN=$src/target/release/revirt
fi
export BEFORE_REV

export BENCH_OUT=target/bench
# Keep scripts/bench-long.sh's results (a 10-minute run of its own); the
# table quotes them with their date.
mkdir -p "$BENCH_OUT" && find "$BENCH_OUT" -mindepth 1 -maxdepth 1 ! -name long.json ! -name long ! -name short ! -name seek-compare.json -exec rm -rf {} +
if [ -z "${NO_QEMU:-}" ] && only qemu; then
    # The SDK's third-party programs (zlib, Lua) join the QEMU comparison.
    { bash scripts/third-party.sh && make -s -C guests/programs; } >/dev/null 2>&1 \
        || echo "bench: could not build the SDK programs; their QEMU rows will be missing" >&2
fi
if [ -z "${NO_MIGRATE:-}" ] && only migrate; then
    # Migration of a recorded VM: downtime and the destination's resume.
    RECORD=1 MEMS=64M PAGES="256 1024" bash scripts/bench-migrate.sh "${MIGRATE_REPS:-5}" >"$BENCH_OUT/migrate.txt" 2>&1 \
        || echo "bench: scripts/bench-migrate.sh failed; see $BENCH_OUT/migrate.txt" >&2
fi

exec python3 - "$@" <<'PY'
import json, math, os, re, shutil, statistics, struct, subprocess, sys, time

NOW = os.path.abspath("target/release/revirt")
BEFORE = os.environ.get("BEFORE_BIN") or None
G = os.path.abspath("guests/demo/out/vm.img")
OUT = os.path.abspath(os.environ["BENCH_OUT"])
REPS = int(os.environ.get("REPS", "3"))
QEMU = None if os.environ.get("NO_QEMU") else shutil.which("qemu-system-x86_64")
res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "reps": REPS,
       "before": os.environ.get("BEFORE_REV") if BEFORE else None,
       "now": subprocess.run(["git", "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE, text=True).stdout.strip(),
       "load_start": os.getloadavg()}
ROWS = []   # (section, what, before, now, target, verdict)

class Proc:
    pass

# CPU time and peak RSS per child: subprocess reaps with waitpid; use wait4.
_orig_wait = subprocess.Popen._try_wait
RU = []
def _try_wait(self, wait_flags):
    pid, sts, ru = os.wait4(self.pid, wait_flags)
    if pid == self.pid:
        RU.append((ru.ru_utime + ru.ru_stime, ru.ru_maxrss))
    return (pid, sts)
subprocess.Popen._try_wait = _try_wait

def sh(cmd, ok=(0,)):
    """Runs cmd; returns (wall s, proc) with proc.cpu (user+sys s) and proc.rss (peak KiB)."""
    t = time.perf_counter()
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = child.communicate()
    dt = time.perf_counter() - t
    p = Proc(); p.returncode = child.returncode; p.stdout = out; p.stderr = err
    if p.returncode not in ok:
        sys.exit(f"bench: {' '.join(cmd)} exited {p.returncode}\n{out[-2000:]}\n{err[-2000:]}")
    p.cpu, p.rss = RU.pop()
    return dt, p

def med(xs): return statistics.median(xs)
def gmean(xs): return math.exp(sum(math.log(x) for x in xs) / len(xs))
def d(name): return os.path.join(OUT, name)

def record(binary, name, cmdline, ckpt="1s", mem=None, clock="exit", image=G):
    shutil.rmtree(d(name), ignore_errors=True)
    cmd = [binary, "record", image, f"--cmdline={cmdline}", "-o", d(name), "--clock", clock, "--checkpoint-every", ckpt]
    if mem: cmd += ["--mem", mem]
    dt, p = sh(cmd)
    m = re.search(r"(\d+) exits, (\d+) events \((\d+) bytes of log\), (\d+) checkpoints \((\d+) bytes\)", p.stderr)
    p.stats = dict(zip(["exits", "events", "log_bytes", "checkpoints", "checkpoint_bytes"], map(int, m.groups()))) if m else {}
    m = re.search(r"checkpoint pauses: median ([\d.]+) ms, max ([\d.]+) ms, median cpu ([\d.]+) ms \(median (\d+) dirty pages", p.stderr)
    p.pause = (float(m.group(1)), float(m.group(2)), int(m.group(4)), float(m.group(3))) if m else None
    # CPU by thread (s): the vCPU thread, the part of it in checkpoint pauses, the checkpoint thread.
    m = re.search(r"cpu by thread: vCPU ([\d.]+) ms \(([\d.]+) ms of it in checkpoint pauses\), checkpoint writer ([\d.]+) ms", p.stderr)
    p.threads = tuple(float(x) / 1000 for x in m.groups()) if m else None
    return dt, p

def run(binary, cmdline, mem=None, image=G):
    return sh([binary, "run", image, f"--cmdline={cmdline}"] + (["--mem", mem] if mem else []))

def replay(binary, name, *extra):
    dt, p = sh([binary, "replay", "-q", d(name), *extra])
    if not extra and "replay matches the recording" not in p.stderr:
        sys.exit(f"bench: replay of {name} did not match:\n{p.stderr[-2000:]}")
    return dt, p

def section(t): print(f"\n== {t}", file=sys.stderr, flush=True)
def f(x, n=2): return "-" if x is None else f"{x:.{n}f}"
def verdict(x, limit, le=True):
    if x is None: return "not measured"
    return "met" if (x <= limit if le else x >= limit) else "miss"
BINS = [("now", NOW)] + ([("before", BEFORE)] if BEFORE else [])
# ONLY=ckpt,mem runs only those sections (record log ckpt mem tt qemu migrate long).
ONLY = set(filter(None, os.environ.get("ONLY", "").split(",")))
def want(key): return not ONLY or key in ONLY
# The 64M/4G rows time 0.02 s runs: more repetitions (MEM_REPS, default 3 x REPS).
MEM_REPS = int(os.environ.get("MEM_REPS", str(3 * REPS)))

# ---------------------------------------------------------------- record / replay per workload
if want("record"):
    section("record/run and replay/record per workload (exit clock, default --checkpoint-every 1s)")
    WORKLOADS = [
        ("compute", "workload=compute iters=400000000"),
        ("race exits=16", "workload=race exits=16 iters=200000"),
        ("dirty pages=4096", "workload=dirty iters=2000 pages=4096"),
        ("mem", "workload=mem iters=3000000 pages=2048"),
        ("branchy", "workload=branchy iters=6000000"),
        ("fpu", "workload=fpu iters=4000000"),
    ]
    res["workloads"] = []
    for label, cl in WORKLOADS:
        w = {"workload": label, "cmdline": cl}
        t = {k: [] for k in ["run", "rec_now", "rep_now", "rec_before", "rep_before", "rec_nockpt"]}
        c = {k: [] for k in t}
        th = {"rec_now": [], "rec_nockpt": []}
        for i in range(REPS):   # interleaved: run, record+replay now, record+replay before
            dt, p = run(NOW, cl); t["run"].append(dt); c["run"].append(p.cpu)
            for tag, b in BINS:
                dt, p = record(b, f"w-{tag}", cl); t[f"rec_{tag}"].append(dt); c[f"rec_{tag}"].append(p.cpu)
                w["exits"] = p.stats.get("exits"); w["events"] = p.stats.get("events")
                if tag == "now": th["rec_now"].append(p.threads)
                dt, p = replay(b, f"w-{tag}"); t[f"rep_{tag}"].append(dt); c[f"rep_{tag}"].append(p.cpu)
            if label.startswith("dirty"):
                # The same recording without checkpoints (dirty logging on, one
                # KVM_GET_DIRTY_LOG at the end for the state hash): splits record's cost.
                dt, p = record(NOW, "w-nockpt", cl, ckpt="0"); t["rec_nockpt"].append(dt); c["rec_nockpt"].append(p.cpu)
                th["rec_nockpt"].append(p.threads)
        if th["rec_nockpt"] and all(th["rec_now"] + th["rec_nockpt"]):
            w["threads_now_s"] = [med([x[k] for x in th["rec_now"]]) for k in range(3)]
            w["threads_nockpt_s"] = [med([x[k] for x in th["rec_nockpt"]]) for k in range(3)]
        for k in t:
            if t[k]: w[k + "_s"] = med(t[k]); w[k + "_cpu_s"] = med(c[k])
        for tag, _ in BINS:
            w[f"rec_over_run_{tag}"] = w[f"rec_{tag}_s"] / w["run_s"]
            w[f"rep_over_rec_{tag}"] = w[f"rep_{tag}_s"] / w[f"rec_{tag}_s"]
        res["workloads"].append(w)
        print(f"  {w}", file=sys.stderr)
        b = w.get("rec_over_run_before")
        cb = w["rec_before_cpu_s"] / w["run_cpu_s"] if b else None
        cn = w["rec_now_cpu_s"] / w["run_cpu_s"]
        ROWS.append(("record", f"record/run, {label} (run {f(w['run_s'],3)} s, {w['exits']} exits)",
                     f"{f(b)}x (cpu {f(cb)}x)" if b else "-", f"{f(w['rec_over_run_now'])}x (cpu {f(cn)}x)", "<= 1.05x",
                     verdict(w["rec_over_run_now"], 1.05) + ("" if (w["rec_over_run_now"] <= 1.05) == (cn <= 1.05) else f" (cpu: {verdict(cn, 1.05)})")))
        if "threads_now_s" in w:
            # Where record's extra CPU goes (medians, s): the vCPU thread outside checkpoint
            # pauses is the guest's own execution (KVM_RUN, write faults included).
            (v, ps, ck), (v0, _, _) = w["threads_now_s"], w["threads_nockpt_s"]
            run_cpu = w["run_cpu_s"]
            ROWS.append(("record", f"  {label}: record CPU by thread vs run; record with --checkpoint-every 0", "-",
                         f"run {f(run_cpu,3)} s; record {f(w['rec_now_cpu_s'],3)} s = guest on vCPU {f(v - ps,3)} + pauses {f(ps,3)} + ckpt thread {f(ck,3)} + other {f(w['rec_now_cpu_s'] - v - ck,3)}; "
                         f"no ckpts: record {f(w['rec_nockpt_cpu_s'],3)} s ({f(w['rec_nockpt_cpu_s'] / run_cpu)}x), guest on vCPU {f(v0,3)} s", "-", "-"))
    for w in res["workloads"]:
        b = w.get("rep_over_rec_before")
        cb = w["rep_before_cpu_s"] / w["rec_before_cpu_s"] if b else None
        cn = w["rep_now_cpu_s"] / w["rec_now_cpu_s"]
        ROWS.append(("replay", f"replay/record, {w['workload']}", f"{f(b)}x (cpu {f(cb)}x)" if b else "-",
                     f"{f(w['rep_over_rec_now'])}x (cpu {f(cn)}x)", "<= 1.0x",
                     verdict(w["rep_over_rec_now"], 1.0) + ("" if (w["rep_over_rec_now"] <= 1.0) == (cn <= 1.0) else f" (cpu: {verdict(cn, 1.0)})")))

# ---------------------------------------------------------------- log size
if want("log"):
    section("log size")
    def log_stats(name):
        b = open(os.path.join(d(name), "events.log"), "rb").read()
        off, ev, raw = 8, 0, 0
        while off + 28 <= len(b) and b[off:off + 4] == b"CHNK":
            _seq, _first, n, rl, cl = struct.unpack_from("<IQIII", b, off + 4)
            ev += n; raw += rl; off += 28 + cl + 32
        return {"events": ev, "raw_bytes": raw, "file_bytes": len(b)}
    dt, p = record(NOW, "log", "workload=race exits=16 iters=200000")
    L = log_stats("log"); L["record_s"] = dt
    res["log"] = L
    ROWS.append(("log", f"log bytes/event, race exits=16 ({L['events']} events), compressed / raw", "-",
                 f"{f(L['file_bytes']/L['events'])} / {f(L['raw_bytes']/L['events'])}", "<= 16", verdict(L['file_bytes']/L['events'], 16)))

# ---------------------------------------------------------------- checkpoints
if want("ckpt"):
    section("checkpoint cost: --checkpoint-every 10ms vs 0, dirty workload")
    res["checkpoints"] = []
    for pages in [1024, 4096, 12288]:
        cl = f"workload=dirty iters=60 pages={pages}"
        r = {"pages_written": pages}
        for tag, b in BINS:
            t0, t1, c0, c1, pauses, th0, th1 = [], [], [], [], [], [], []
            for i in range(REPS):
                dt, p = record(b, f"ck0-{tag}", cl, ckpt="0"); t0.append(dt); c0.append(p.cpu); th0.append(p.threads)
                dt, p = record(b, f"ck-{tag}", cl, ckpt="10ms"); t1.append(dt); c1.append(p.cpu); th1.append(p.threads)
                n = p.stats["checkpoints"] - 1
                if p.pause: pauses.append(p.pause)
            r[tag] = {"incremental": n, "wall_ms_per_ckpt": (med(t1) - med(t0)) / max(1, n) * 1000,
                      "cpu_ms_per_ckpt": (med(c1) - med(c0)) / max(1, n) * 1000}
            if th1[0] is not None and th0[0] is not None:
                # Where the extra CPU of checkpoints went, by thread (medians over the reps):
                # the recorder's own work = the vCPU thread's checkpoint pauses + the checkpoint
                # thread (less its checkpoint 0, which the run without checkpoints also has);
                # the guest's = the vCPU thread outside the pauses, less the same without checkpoints
                # (KVM_RUN: the write faults after each KVM_GET_DIRTY_LOG re-protects the pages).
                own = med([x[1] for x in th1]) + med([x[2] for x in th1]) - med([x[2] for x in th0])
                guest = med([x[0] - x[1] for x in th1]) - med([x[0] for x in th0])
                r[tag]["own_ms_per_ckpt"] = own / max(1, n) * 1000
                r[tag]["guest_ms_per_ckpt"] = guest / max(1, n) * 1000
            if pauses:
                r[tag]["pause_median_ms"] = med([x[0] for x in pauses]); r[tag]["pause_max_ms"] = max(x[1] for x in pauses)
                r[tag]["dirty_pages"] = med([x[2] for x in pauses])
                r[tag]["pause_cpu_median_ms"] = med([x[3] for x in pauses])
        dp = r["now"].get("dirty_pages", pages + 1)
        for tag, _ in BINS:
            for k in ["cpu", "wall", "own", "guest"]:
                if f"{k}_ms_per_ckpt" in r[tag]:
                    r[tag][f"{k}_ms_per_1000"] = r[tag][f"{k}_ms_per_ckpt"] / dp * 1000
        r["now"]["pause_ms_per_1000"] = r["now"].get("pause_median_ms", float("nan")) / dp * 1000
        r["now"]["pause_cpu_ms_per_1000"] = r["now"].get("pause_cpu_median_ms", float("nan")) / dp * 1000
        res["checkpoints"].append(r)
        print(f"  {r}", file=sys.stderr)
        bf = r.get("before")
        # Before, the vCPU stood still for the whole checkpoint (copy, compress, write on its thread).
        ROWS.append(("ckpt", f"checkpoint vCPU pause per 1,000 dirty pages ({dp:.0f} pages, {r['now']['incremental']} ckpts)",
                     f"{f(bf['wall_ms_per_1000'],1)} ms (whole checkpoint)" if bf else "-",
                     f"{f(r['now']['pause_ms_per_1000'],2)} ms wall, {f(r['now']['pause_cpu_ms_per_1000'],2)} ms cpu (max pause {f(r['now'].get('pause_max_ms'),1)} ms)", "<= 1 ms",
                     verdict(r["now"]["pause_ms_per_1000"], 1.0) + ("" if (r["now"]["pause_ms_per_1000"] <= 1) == (r["now"]["pause_cpu_ms_per_1000"] <= 1) else f" (cpu: {verdict(r['now']['pause_cpu_ms_per_1000'], 1.0)})")))
        ROWS.append(("ckpt", f"checkpoint CPU per 1,000 dirty pages ({dp:.0f} pages)",
                     f"{f(bf['cpu_ms_per_1000'],1)} ms" if bf else "-", f"{f(r['now']['cpu_ms_per_1000'],1)} ms", "<= 5 ms",
                     verdict(r["now"]["cpu_ms_per_1000"], 5.0)))
        if "own_ms_per_1000" in r["now"]:
            nw = r["now"]
            ROWS.append(("ckpt", f"  of which the recorder's own work (vCPU thread's pauses + checkpoint thread) ({dp:.0f} pages)", "-",
                         f"{f(nw['own_ms_per_1000'],1)} ms", "<= 5 ms", verdict(nw["own_ms_per_1000"], 5.0)))
            ROWS.append(("ckpt", f"  of which the guest's extra execution on the vCPU thread (write faults on re-protected pages) ({dp:.0f} pages)", "-",
                         f"{f(nw['guest_ms_per_1000'],1)} ms (other threads {f(nw['cpu_ms_per_1000'] - nw['own_ms_per_1000'] - nw['guest_ms_per_1000'],1)} ms)", "-", "-"))

# ---------------------------------------------------------------- guest RAM size
if want("mem"):
    section("record/replay of compute iters=1000 at 64M vs 4G (checkpoint 0, state hash, RSS)")
    res["memsize"] = {}
    for tag, b in BINS:
        # 64M and 4G interleaved, so that load changes hit both alike.
        runs = {mem: {k: [] for k in ["ts", "rs", "rss_r", "rss_p", "tc", "rc"]} for mem in ["64M", "4G"]}
        for i in range(MEM_REPS):
            for mem in ["64M", "4G"]:
                if (tag, mem) == ("before", "4G") and i > 0: continue   # before: ~30 s + ~20 s each
                x = runs[mem]
                dt, p = record(b, f"m-{tag}-{mem}", "workload=compute iters=1000", mem=mem); x["ts"].append(dt); x["rss_r"].append(p.rss); x["tc"].append(p.cpu)
                dt, p = replay(b, f"m-{tag}-{mem}"); x["rs"].append(dt); x["rss_p"].append(p.rss); x["rc"].append(p.cpu)
        for mem, x in runs.items():
            res["memsize"][f"{tag}-{mem}"] = {"record_s": med(x["ts"]), "replay_s": med(x["rs"]), "record_cpu_s": med(x["tc"]), "replay_cpu_s": med(x["rc"]),
                                             "record_rss_kib": max(x["rss_r"]), "replay_rss_kib": max(x["rss_p"]),
                                             "ckpt0_bytes": os.path.getsize(os.path.join(d(f"m-{tag}-{mem}"), "checkpoints", "000000.ckpt"))}
            print(f"  {tag} {mem}: {res['memsize'][tag + '-' + mem]}", file=sys.stderr)
    M = res["memsize"]
    def mrow(tag, key, unit, n=2, scale=1):
        if f"{tag}-4G" not in M: return "-"
        a, b = M[f"{tag}-64M"][key] * scale, M[f"{tag}-4G"][key] * scale
        return f"{f(a,n)} / {f(b,n)} {unit}"
    for key, what, unit, n, scale in [("record_s", "record", "s", 3, 1), ("replay_s", "replay", "s", 3, 1),
                                       ("record_rss_kib", "record peak RSS", "MiB", 0, 1 / 1024),
                                       ("replay_rss_kib", "replay peak RSS", "MiB", 0, 1 / 1024),
                                       ("ckpt0_bytes", "checkpoint 0 file", "KiB", 0, 1 / 1024)]:
        ratio = M["now-4G"][key] / M["now-64M"][key]
        tgt = "4G ≈ 64M (<= 1.2x)"
        vd, cpu = verdict(ratio, 1.2), ""
        if key.endswith("_s"):
            # 0.02-0.05 s runs: wall time on a loaded host is noisy; CPU time is given beside it.
            cr = M["now-4G"][key.replace("_s", "_cpu_s")] / max(1e-9, M["now-64M"][key.replace("_s", "_cpu_s")])
            cpu = f"; cpu {f(cr)}x"
            vd += "" if (ratio <= 1.2) == (cr <= 1.2) else f" (cpu: {verdict(cr, 1.2)})"
        ROWS.append(("mem", f"{what}, compute iters=1000, --mem 64M / 4G", mrow("before", key, unit, n, scale),
                     mrow("now", key, unit, n, scale) + f" ({f(ratio)}x{cpu})", tgt, vd))
    # What a bigger guest still costs per process: the kernel's memory slot
    # (KVM_SET_USER_MEMORY_REGION allocates per-page metadata for the whole
    # slot: O(RAM), whatever the guest touches), timed under strace.
    STRACE = shutil.which("strace")
    if STRACE:
        slot = {}
        for mem in ["64M", "4G"]:
            ts = []
            for i in range(MEM_REPS):
                tr = d(f"strace-{mem}.txt")
                sh([STRACE, "-T", "-e", "trace=ioctl", "-o", tr, NOW, "replay", "-q", d(f"m-now-{mem}")])
                ts += [float(x) * 1000 for x in re.findall(r"KVM_SET_USER_MEMORY_REGION.*<([\d.]+)>", open(tr).read())]
            slot[mem] = med(ts) if ts else None
        res["memsize"]["slot_setup_ms"] = slot
        if None not in slot.values():
            gap = (M["now-4G"]["replay_s"] - M["now-64M"]["replay_s"]) * 1000
            ROWS.append(("mem", "  replay's KVM_SET_USER_MEMORY_REGION (the kernel's per-page slot metadata), 64M / 4G (under strace)", "-",
                         f"{f(slot['64M'],2)} / {f(slot['4G'],2)} ms (replay gap {f(gap,1)} ms)", "-", "-"))

# ---------------------------------------------------------------- time travel
if want("tt"):
    section("time travel (seek = restore nearest checkpoint + roll forward; gdb reverse-stepi)")
    dt, p = record(NOW, "long", "workload=race exits=16 iters=200000", ckpt="100ms")
    E = p.stats["exits"]
    tt = {"exits": E, "checkpoints": p.stats["checkpoints"]}
    for tag, b in BINS:
        if tag == "before":   # same recording format needed: record it with the before binary
            record(b, "long-before", "workload=race exits=16 iters=200000", ckpt="100ms")
        name = "long" if tag == "now" else "long-before"
        ts = []
        for frac in [0.1, 0.3, 0.5, 0.7, 0.9]:
            for k in range(REPS):
                ts.append(replay(b, name, "--to", str(int(E * frac) + 37 * k))[0])
        tt[f"seek_{tag}_ms"] = med(ts) * 1000
    GDB = shutil.which("gdb")
    def gdb_batch(port, n):
        cmd = [GDB, "-nx", "-batch", "-ex", "set architecture i386:x86-64", "-ex", "set pagination off",
               "-ex", f"target remote 127.0.0.1:{port}"] + ["-ex", "reverse-stepi"] * n + ["-ex", "disconnect", G]
        return sh(cmd, ok=(0, 1))[0]
    if GDB:
        for tag, b in BINS:
            name = "long" if tag == "now" else "long-before"
            srv = subprocess.Popen([b, "gdb", d(name), "--port", "0", "--at", str(int(E * 0.5))],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            port = None
            for line in srv.stderr:
                m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
                if m: port = int(m.group(1)); break
            per = []
            for _ in range(REPS):
                t0 = gdb_batch(port, 0); t1 = gdb_batch(port, 5)
                per.append((t1 - t0) / 5)
            srv.kill(); srv.wait(); RU.pop() if RU else None
            tt[f"rsi_{tag}_ms"] = med(per) * 1000
    res["time_travel"] = tt
    print(f"  {tt}", file=sys.stderr)
    ROWS.append(("tt", f"seek `replay --to N` as a new process, median over 5 depths ({E} exits, 100 ms ckpts)",
                 f"{f(tt.get('seek_before_ms'),0)} ms" if BEFORE else "-", f"{f(tt['seek_now_ms'],0)} ms", "-", "-"))
    if GDB:
        ROWS.append(("tt", "gdb reverse-stepi in one session at 50 % (median of 5-step batches)",
                     f"{f(tt.get('rsi_before_ms'),1)} ms" if BEFORE else "-", f"{f(tt['rsi_now_ms'],1)} ms", "<= 50 ms",
                     verdict(tt["rsi_now_ms"], 50)))

# ---------------------------------------------------------------- QEMU
if want("qemu"):
    res["qemu"] = []
    QW = [("compute", G, "workload=compute iters=200000000"), ("dirty", G, "workload=dirty iters=2000 pages=4096"),
          ("mem", G, "workload=mem iters=3000000 pages=2048"), ("branchy", G, "workload=branchy iters=6000000"),
          ("fpu", G, "workload=fpu iters=4000000")]
    # The guest SDK's third-party programs (guests/programs, docs/guest-sdk.md).
    SDK = os.path.abspath("guests/programs/out")
    LUA = ("-e local t = {} for i = 1, 200000 do t[i] = (i * 7919) % 100003 end table.sort(t) "
           "local s = 0 for i = 1, #t, 7 do s = s + t[i] end print('lua: sum', s, #t)")
    for label, img, cl in [("zlib", "zdemo.img", "gen=4000000 level=6"), ("lua", "luademo.img", LUA)]:
        if os.path.exists(os.path.join(SDK, img)):
            QW.append((label, os.path.join(SDK, img), cl))
    if QEMU:
        qver = subprocess.run([QEMU, "--version"], stdout=subprocess.PIPE, text=True).stdout.splitlines()[0]
        res["qemu_version"] = qver
        for label, QIMG, QCL in QW:
            section(f"QEMU TCG rr vs revirt, {os.path.basename(QIMG)} {QCL}")
            qbase = [QEMU, "-kernel", QIMG, "-append", QCL, "-m", "64M", "-display", "none", "-serial", "stdio",
                     "-monitor", "none", "-net", "none", "-device", "isa-debug-exit,iobase=0x550,iosize=4"]
            rrf = os.path.join(OUT, "qemu.rr")
            q = {k: [] for k in ["plain", "record", "replay", "revirt_run", "revirt_record", "revirt_replay"]}
            outs = set()
            # The demo's result line, or an SDK program's whole output.
            def res_line(s):
                if QIMG != G: return [l for l in s.splitlines() if l.strip()]
                return [l for l in s.splitlines() if l.startswith(label.split()[0] + ":")][-1:]
            for i in range(REPS):
                # isa-debug-exit: status v becomes (v << 1) | 1, so the guest's 0 is 1.
                dt, p = sh(qbase, ok=(1,)); q["plain"].append(dt); outs.add(tuple(res_line(p.stdout)))
                dt, p = sh(qbase + ["-icount", f"shift=auto,rr=record,rrfile={rrf}"], ok=(1,)); q["record"].append(dt); outs.add(tuple(res_line(p.stdout)))
                dt, p = sh(qbase + ["-icount", f"shift=auto,rr=replay,rrfile={rrf}"], ok=(1,)); q["replay"].append(dt); outs.add(tuple(res_line(p.stdout)))
                dt, p = run(NOW, QCL, image=QIMG); q["revirt_run"].append(dt); outs.add(tuple(res_line(p.stdout)))
                dt, p = record(NOW, "qcmp", QCL, image=QIMG); q["revirt_record"].append(dt); outs.add(tuple(res_line(p.stdout)))
                dt, p = sh([NOW, "replay", d("qcmp")]); q["revirt_replay"].append(dt); outs.add(tuple(res_line(p.stdout)))
            qm = {k: med(v) for k, v in q.items()}
            qm.update(workload=label, cmdline=QCL, same_output=len(outs) == 1, output=list(outs)[0],
                      rec_ratio=qm["record"] / qm["revirt_record"], rep_ratio=qm["replay"] / qm["revirt_replay"],
                      plain_ratio=qm["plain"] / qm["revirt_run"])
            res["qemu"].append(qm)
            print(f"  {qm}", file=sys.stderr)
            args = QCL.split(' ', 1)[1] if QIMG == G else ("Lua 5.4 table sort, 200k" if label == "lua" else f"zlib 1.2.13, {QCL}")
            ROWS.append(("qemu", f"QEMU rr=record / revirt record, {label} ({args})", "-",
                         f"{f(qm['record'],2)} / {f(qm['revirt_record'],2)} s = {f(qm['rec_ratio'],1)}x", ">= 20x", verdict(qm["rec_ratio"], 20, le=False)))
            ROWS.append(("qemu", f"QEMU rr=replay / revirt replay, {label}", "-",
                         f"{f(qm['replay'],2)} / {f(qm['revirt_replay'],2)} s = {f(qm['rep_ratio'],1)}x", "-", "-"))
            ROWS.append(("qemu", f"QEMU plain TCG / revirt run, {label}; same result line: {qm['same_output']}", "-",
                         f"{f(qm['plain'],2)} / {f(qm['revirt_run'],2)} s = {f(qm['plain_ratio'],1)}x", "-", "-"))
        if res["qemu"]:
            g1 = gmean([q["rec_ratio"] for q in res["qemu"]]); g2 = gmean([q["rep_ratio"] for q in res["qemu"]])
            res["qemu_gmean"] = {"record": g1, "replay": g2}
            ROWS.append(("qemu", f"QEMU / revirt, geometric mean over {len(res['qemu'])} workloads: record / replay", "-",
                         f"{f(g1,1)}x / {f(g2,1)}x", ">= 20x (record)", verdict(g1, 20, le=False)))

# ---------------------------------------------------------------- migration of a recorded VM (bench-migrate.sh, run above)
if want("migrate"):
    mj = os.path.join(OUT, "migrate.json")
    if os.path.exists(mj):
        res["migrate"] = json.load(open(mj))
        for m in res["migrate"]:
            r = m["r"]
            if not r: continue
            rate = m["pages_per_tick"] * 100
            ROWS.append(("migrate", f"migration downtime, recorded VM, {m['mem']}, {rate:,} dirty pages/s (median of {r['n']})", "-",
                         f"{f(r['downtime_ms'],2)} ms ({f(r['total_ms'],0)} ms in all, {f(r['mib'],1)} MiB)",
                         "<= 5 ms" if rate == 25600 else "-", verdict(r["downtime_ms"], 5) if rate == 25600 else "-"))
            if r.get("dst_resume_ms") is not None:
                ROWS.append(("migrate", f"destination resume, {rate:,} pages/s: final state arrived / commit arrived -> guest running", "-",
                             f"{f(r['dst_resume_ms'],3)} / {f(r['dst_after_commit_ms'],3)} ms", "-", "-"))

# ---------------------------------------------------------------- a 10-minute recording (bench-long.sh, its own run)
if want("long"):
    LONG_FROM = os.path.abspath(os.environ.get("LONG_FROM") or OUT)
    lj = os.path.join(LONG_FROM, "long.json")
    if os.path.exists(lj):
        Lr = json.load(open(lj)); res["long"] = Lr
        L, S = Lr["long"], Lr["short"]
        tag = f"bench-long.sh {Lr['date']}"
        # The seek index grows with the log (format 3 on): counted with it.
        ix = os.path.join(L.get("dir", ""), "events.idx")
        ix_bytes = os.path.getsize(ix) if os.path.exists(ix) else 0
        grow = (L["log_bytes"] + L["console_bytes"] + ix_bytes) / L["seconds"]
        ROWS.append(("long", f"log growth (events.log + events.idx + console.log), workload=idle {L['seconds']} s, 100 Hz, input every 5 s ({tag}): per hour / per day", "-",
                     f"{f(grow*3600/1e6,1)} MB / {f(grow*86400/1e6,0)} MB", "<= 1 GB/day", verdict(grow * 86400 / 1e9, 1.0)))
        ROWS.append(("long", f"checkpoints after {L['seconds']} s at 1 s, --keep-checkpoints {Lr['keep']}: kept / taken, bytes kept / written", "-",
                     f"{L['kept']} / {L['checkpoints']}, {f(L['kept_bytes']/1e3,0)} / {f(L['checkpoint_bytes_written']/1e3,0)} KB", "bounded", "met" if L["dropped"] > 0 else "miss"))
        sk = Lr["seek_ms"]
        ratio = sk["long_late"] / sk["short_late"]
        cj = os.path.join(LONG_FROM, "seek-compare.json")
        if os.path.exists(cj):
            # Seeks before/after the seek index, side by side (bench-long.sh COMPARE=1).
            C = json.load(open(cj)); res["seek_compare"] = C; m = C["median_ms"]
            ctag = f"bench-long.sh COMPARE {C['date']}, median of {C['reps']}; before = {C.get('before_rev', '?')} on its own recordings"
            for what in ["seek 0.5 s before the end", "seek 50 exits past the last checkpoint before that"]:
                side = lambda s: (m[f"{what}, 10-minute recording | {s}"], m[f"{what}, 10 s recording | {s}"])
                (lb, sb), (la, sa) = side("before"), side("after")
                rb, ra, rc = lb["wall"] / sb["wall"], la["wall"] / sa["wall"], la["cpu"] / sa["cpu"]
                rcb = lb["cpu"] / sb["cpu"]
                # The checkpoint files the seek opened (bench-long.sh counts them under strace).
                op = C.get("checkpoint_files_opened", {})
                files = lambda s: (f", {op[f'{what}, 10-minute recording | {s}']} / {op[f'{what}, 10 s recording | {s}']} ckpt files opened"
                                   if f"{what}, 10 s recording | {s}" in op else "")
                ROWS.append(("long", f"{what}: 10-minute vs 10 s recording, new process, wall ({ctag})",
                             f"{f(lb['wall'],0)} / {f(sb['wall'],0)} ms ({f(rb)}x; cpu {f(rcb)}x{files('before')})",
                             f"{f(la['wall'],0)} / {f(sa['wall'],0)} ms ({f(ra)}x; cpu {f(rc)}x{files('after')})",
                             "same (<= 1.2x)", verdict(ra, 1.2) + ("" if (ra <= 1.2) == (rc <= 1.2) else f" (cpu: {verdict(rc, 1.2)})")))
            for what in ["seek to the middle", "seek to 10 %"]:
                b, a_ = m[f"{what}, 10-minute recording | before"], m[f"{what}, 10-minute recording | after"]
                ROWS.append(("long", f"{what} of the 10-minute recording (roll-forward from a thinned-out checkpoint)", f"{f(b['wall'],0)} ms", f"{f(a_['wall'],0)} ms", "-", "-"))
        else:
            ROWS.append(("long", f"seek 0.5 s before the end: {L['seconds']} s vs {S['seconds']} s recording (new process)", "-",
                         f"{f(sk['long_late'],0)} / {f(sk['short_late'],0)} ms ({f(ratio)}x)", "same (<= 1.2x)", verdict(ratio, 1.2)))
        if "verify_ms" in Lr and not os.path.exists(cj):
            v = Lr["verify_ms"]
            ROWS.append(("long", f"of which `verify` (every reader checks the whole recording first): {L['seconds']} s vs {S['seconds']} s", "-",
                         f"{f(v['long'],0)} / {f(v['short'],0)} ms", "-", "-"))
        if not os.path.exists(cj):
            ROWS.append(("long", f"seek to the middle / to 10 % of the {L['seconds']} s recording (sparser checkpoints there)", "-",
                         f"{f(sk['long_mid'],0)} / {f(sk['long_early'],0)} ms", "-", "-"))

res["load_end"] = os.getloadavg()
json.dump(res, open(os.path.join(OUT, "bench.json"), "w"), indent=1)

# ---------------------------------------------------------------- the table
hdr = ("what", f"before ({res['before']})" if BEFORE else "before", f"now ({res['now']})", "target", "verdict")
w = [max(len(str(r[i + 1])) for r in ROWS + [("",) + hdr]) for i in range(5)]
print(f"\nrevirt bench, {res['date']}, median of {REPS}, load average {res['load_start'][0]:.1f} -> {res['load_end'][0]:.1f}; "
      f"JSON: {os.path.relpath(OUT)}/bench.json")
print("| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(hdr)) + " |")
print("|" + "|".join("-" * (x + 2) for x in w) + "|")
for r in ROWS:
    print("| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r[1:])) + " |")
PY
