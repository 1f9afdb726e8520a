#!/usr/bin/env bash
# A long recording of a timer-driven, mostly idle guest (workload=idle: a
# 100 Hz tick that reads the clock and rewrites a few words of a 256-page
# working set, a line of serial input every 5 s echoed back, a status line
# a second): log growth per hour and per day, checkpoint storage under the
# retention policy (--keep-checkpoints, default 16), and the cost of a seek
# to a late point on this recording vs on a short one made the same way.
#
#   bash scripts/bench-long.sh            # 600 s (10 minutes) + a 10 s one
#   SECONDS_LONG=60 bash scripts/bench-long.sh     # a quick try
#   KEEP=0 bash scripts/bench-long.sh     # without retention
#   REPS=5                                # seeks per point (median)
#   REVIRT_BIN=/tmp/revirt bash scripts/bench-long.sh  # a copy, so builds meanwhile do not change it
#   SEEK_ONLY=1 bash scripts/bench-long.sh  # measure seeks, verify and replay again on the
#                                           # recordings of the last run (target/bench/long.json)
#   RECORD_ONLY=1 OUT=DIR                   # only make the recordings (into DIR)
#   COMPARE=1 BEFORE_BIN=B BEFORE_DIR=D OUT=DIR [BEFORE_REV=commit]   # seeks and verify side by side:
#                                           # binary B on the recordings in D (made by B) vs this one on
#                                           # those in DIR (both made with RECORD_ONLY=1 by their binary);
#                                           # writes target/bench/seek-compare.json for bench.sh
# The guest runs in real time (its timer is the host's), so the run takes
# SECONDS_LONG + SECONDS_SHORT seconds; it uses little CPU. Prints a table,
# writes target/bench/long.json. Nothing here asserts.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
export LONG=${SECONDS_LONG:-600} SHORT=${SECONDS_SHORT:-10} HZ=${HZ:-100} PAGES=${PAGES:-4}
export KEEP=${KEEP:-} EVERY=${EVERY:-1s} REPS=${REPS:-5}
mkdir -p "${OUT:-target/bench}"
exec python3 - <<'PY'
import json, os, re, shutil, statistics, subprocess, sys, threading, time

R = os.path.abspath(os.environ.get("REVIRT_BIN") or "target/release/revirt")
G = os.path.abspath("guests/demo/out/vm.img")
OUT = os.path.abspath(os.environ.get("OUT") or "target/bench")
LONG, SHORT, HZ, PAGES, REPS = (int(os.environ[k]) for k in ["LONG", "SHORT", "HZ", "PAGES", "REPS"])
KEEP, EVERY = os.environ["KEEP"], os.environ["EVERY"]
res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "hz": HZ, "pages": PAGES,
       "checkpoint_every": EVERY, "keep": KEEP or "default (16)",
       "now": subprocess.run(["git", "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE, text=True).stdout.strip()}

def du(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)

def record(name, seconds, samples=None):
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    cmd = [R, "record", G, "--cmdline", f"workload=idle iters={seconds} hz={HZ} pages={PAGES}", "-o", d,
           "--checkpoint-every", EVERY] + (["--keep-checkpoints", KEEP] if KEEP else [])
    t0 = time.time()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = []
    reader = threading.Thread(target=lambda: out.append(p.stdout.read()))
    reader.start()
    k = 0
    # Interactive input: a short line every 5 s (the guest echoes it).
    while p.poll() is None:
        time.sleep(1)
        el = time.time() - t0
        if int(el) % 5 == 0:
            try:
                p.stdin.write(f"key {k}\n"); p.stdin.flush(); k += 1
            except (BrokenPipeError, ValueError):
                pass
        if samples is not None and int(el) % 30 == 0 and os.path.exists(os.path.join(d, "events.log")):
            samples.append({"t": el, "log": os.path.getsize(os.path.join(d, "events.log")),
                            "console": os.path.getsize(os.path.join(d, "console.log")),
                            "ckpt_bytes": du(os.path.join(d, "checkpoints")),
                            "ckpt_files": len(os.listdir(os.path.join(d, "checkpoints")))})
    try:
        p.stdin.close()
    except BrokenPipeError:
        pass
    err = p.stderr.read()
    reader.join()
    wall = time.time() - t0
    if p.wait() != 0:
        sys.exit(f"bench-long: record failed:\n{err[-2000:]}")
    m = re.search(r"(\d+) exits, (\d+) events \((\d+) bytes of log\), (\d+) checkpoints \((\d+) bytes\)", err)
    exits, events, log_bytes, ckpts, ckpt_written = map(int, m.groups())
    m = re.search(r"retention kept (\d+) checkpoints \((\d+) bytes on disk\), dropped (\d+)", err)
    kept, kept_bytes, dropped = map(int, m.groups()) if m else (ckpts, du(os.path.join(d, "checkpoints")), 0)
    return {"dir": d, "seconds": seconds, "wall_s": wall, "exits": exits, "events": events,
            "log_bytes": os.path.getsize(os.path.join(d, "events.log")), "console_bytes": os.path.getsize(os.path.join(d, "console.log")),
            "checkpoints": ckpts, "checkpoint_bytes_written": ckpt_written, "kept": kept, "kept_bytes": kept_bytes,
            "dropped": dropped, "inputs": k, "total_bytes": du(d), "stdout_tail": (out[0] if out else "").splitlines()[-1:]}

def cpu_of(fn):
    before = os.times()
    r = fn()
    after = os.times()
    r["cpu_s"] = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return r

def timed(cmd, ok):
    """Wall and CPU (user+sys of the child, from wait4) of one run, in ms."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = (time.perf_counter() - t) * 1000
    if not ok(os.waitstatus_to_exitcode(status), err):
        sys.exit(f"bench-long: {' '.join(cmd)} failed:\n{err[-1500:]}")
    return wall, (ru.ru_utime + ru.ru_stime) * 1000

if os.environ.get("COMPARE"):
    # Seeks before and after the seek index, side by side in one run: the
    # binary of BEFORE_BIN on the recordings of BEFORE_DIR (made by it:
    # format 2, every reader checks the whole recording) and this binary on
    # the recordings in OUT (format 3, made by this binary: a seek checks
    # the index and the log it replays), interleaved, REPS times, medians.
    B_BIN, B_DIR = os.path.abspath(os.environ["BEFORE_BIN"]), os.path.abspath(os.environ["BEFORE_DIR"])
    sides = {"before": (B_BIN, json.load(open(os.path.join(B_DIR, "long.json")))), "after": (R, json.load(open(os.path.join(OUT, "long.json"))))}
    late = lambda r: max(1, r["exits"] - 5 * HZ // 2)
    # Where the late seek starts from depends on where the checkpoints fell:
    # "50 exits after the last checkpoint before that point" rolls forward
    # the same distance on every recording, so what differs is what the
    # recording's length costs (checking, restoring).
    def after_ck(binary, rec):
        t = late(rec)
        p = subprocess.run([binary, "replay", "-q", rec["dir"], "--to", str(t)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        m = re.search(r"starting from checkpoint \d+ \(exit (\d+)\)", p.stderr)
        return int(m.group(1)) + 50 if m else t
    cases = [("seek 0.5 s before the end, 10 s recording", "short", lambda b, r: late(r)), ("seek 0.5 s before the end, 10-minute recording", "long", lambda b, r: late(r)),
             ("seek 50 exits past the last checkpoint before that, 10 s recording", "short", after_ck),
             ("seek 50 exits past the last checkpoint before that, 10-minute recording", "long", after_ck),
             ("seek to the middle, 10-minute recording", "long", lambda b, r: r["exits"] // 2), ("seek to 10 %, 10-minute recording", "long", lambda b, r: r["exits"] // 10)]
    targets = {(name, side): point(binary, rj[which]) for name, which, point in cases for side, (binary, rj) in sides.items()}
    got = {}
    reached = lambda t: (lambda code, err: code == 0 and f"reached exit {t}" in err)
    for rep in range(REPS):
        for name, which, point in cases:
            for side, (binary, rj) in sides.items():
                rec = rj[which]
                t = targets[(name, side)]
                got.setdefault((name, side), []).append(timed([binary, "replay", "-q", rec["dir"], "--to", str(t)], reached(t)))
        for which in ["short", "long"]:
            for side, (binary, rj) in sides.items():
                got.setdefault((f"verify, {which}", side), []).append(timed([binary, "verify", rj[which]["dir"]], lambda c, e: True))
    # The checkpoint files each seek opens (once, under strace when there is one):
    # what a seek's cost grows with when it grows with the recording.
    opened = {}
    if shutil.which("strace"):
        for name, which, point in cases:
            for side, (binary, rj) in sides.items():
                tr = os.path.join(OUT, "strace.txt")
                subprocess.run(["strace", "-f", "-e", "trace=openat", "-o", tr, binary, "replay", "-q", rj[which]["dir"], "--to", str(targets[(name, side)])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                opened[(name, side)] = len(set(re.findall(r'openat\(.*?"([^"]*\.ckpt)"', open(tr).read())))
                os.remove(tr)
    kept = {(side, which): len([f for f in os.listdir(os.path.join(rj[which]["dir"], "checkpoints")) if f.endswith(".ckpt")]) for side, (_, rj) in sides.items() for which in ["short", "long"]}
    ofiles = lambda name, side: f" ({opened[(name, side)]} of {kept[(side, next(w for n, w, _ in cases if n == name))]} checkpoint files opened)" if (name, side) in opened else ""
    med = lambda k, i: statistics.median(x[i] for x in got[k])
    print(f"\nseeks before/after the seek index, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, medians of {REPS} interleaved runs; "
          f"before = {B_BIN} on {B_DIR} (recorded {sides['before'][1].get('recorded')}), after = {R} on {OUT} (recorded {sides['after'][1].get('recorded')})")
    print("| what | before: wall / CPU ms | after: wall / CPU ms |")
    print("|---|---|---|")
    for name, _, _ in cases:
        print(f"| {name} | {med((name, 'before'), 0):.0f} / {med((name, 'before'), 1):.0f}{ofiles(name, 'before')} | {med((name, 'after'), 0):.0f} / {med((name, 'after'), 1):.0f}{ofiles(name, 'after')} |")
    for which in ["short", "long"]:
        k = f"verify, {which}"
        print(f"| `verify` ({'10 s' if which == 'short' else '10-minute'} recording) | {med((k, 'before'), 0):.0f} / {med((k, 'before'), 1):.0f} | {med((k, 'after'), 0):.0f} / {med((k, 'after'), 1):.0f} |")
    for side in ["before", "after"]:
        for what in ["seek 0.5 s before the end", "seek 50 exits past the last checkpoint before that"]:
            s, l = (f"{what}, {x} recording" for x in ["10 s", "10-minute"])
            print(f"{side}: {what}: 10-minute / 10 s = {med((l, side), 0) / med((s, side), 0):.2f}x wall, {med((l, side), 1) / med((s, side), 1):.2f}x CPU")
    summary = {"date": res["date"], "reps": REPS, "before_bin": B_BIN, "before_rev": os.environ.get("BEFORE_REV", "?"), "after_bin": R, "recorded": {side: rj.get("recorded") for side, (_, rj) in sides.items()},
               "seconds": {side: [rj["short"]["seconds"], rj["long"]["seconds"]] for side, (_, rj) in sides.items()},
               "median_ms": {f"{k[0]} | {k[1]}": {"wall": med(k, 0), "cpu": med(k, 1)} for k in got},
               "checkpoint_files_opened": {f"{k[0]} | {k[1]}": v for k, v in opened.items()},
               "checkpoint_files_kept": {f"{k[1]} | {k[0]}": v for k, v in kept.items()}}
    os.makedirs("target/bench", exist_ok=True)
    json.dump(summary, open(os.environ.get("COMPARE_JSON") or "target/bench/seek-compare.json", "w"), indent=1)
    json.dump({"date": res["date"], "reps": REPS, "targets": {f"{k[0]} | {k[1]}": v for k, v in targets.items()}, "runs": {f"{k[0]} | {k[1]}": v for k, v in got.items()}}, open(os.path.join(OUT, "compare.json"), "w"), indent=1)
    sys.exit(0)

if os.environ.get("SEEK_ONLY"):
    old = json.load(open(os.path.join(OUT, "long.json")))
    res.update({k: old[k] for k in ["long", "short", "samples", "keep", "checkpoint_every", "hz", "pages"]})
    res["recorded"] = old.get("recorded", old["date"])
    L, S = res["long"], res["short"]
    print(f"bench-long: seeks only, on the recordings of {res['recorded']}", file=sys.stderr, flush=True)
else:
    print(f"bench-long: recording {LONG} s of workload=idle hz={HZ} pages={PAGES} (and a {SHORT} s one)", file=sys.stderr, flush=True)
    samples = []
    L = cpu_of(lambda: record("long", LONG, samples))
    S = cpu_of(lambda: record("short", SHORT))
    res.update(long=L, short=S, samples=samples, recorded=res["date"])
    if os.environ.get("RECORD_ONLY"):
        json.dump(res, open(os.path.join(OUT, "long.json"), "w"), indent=1)
        sys.exit(0)

def seek(rec, to):
    ts = []
    for _ in range(REPS):
        t = time.perf_counter()
        p = subprocess.run([R, "replay", "-q", rec["dir"], "--to", str(to)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ts.append(time.perf_counter() - t)
        if p.returncode != 0 or f"reached exit {to}" not in p.stderr:
            sys.exit(f"bench-long: seek to {to} failed:\n{p.stderr[-1500:]}")
    return statistics.median(ts) * 1000

def full_replay(rec):
    t = time.perf_counter()
    p = subprocess.run([R, "replay", "-q", rec["dir"]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if "replay matches the recording" not in p.stderr:
        sys.exit(f"bench-long: replay of {rec['dir']} did not match:\n{p.stderr[-1500:]}")
    return (time.perf_counter() - t) * 1000

def verify_ok(rec):
    p = subprocess.run([R, "verify", rec["dir"]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p.returncode == 0

def verify_ms(rec):
    ts = []
    for _ in range(REPS):
        t = time.perf_counter()
        subprocess.run([R, "verify", rec["dir"]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000

# Late point: 0.5 s of guest run before the end (HZ/2 ticks at ~5 exits each); mid point for the long one.
late = lambda r: max(1, r["exits"] - 5 * HZ // 2)
res["seek_ms"] = {"short_late": seek(S, late(S)), "long_late": seek(L, late(L)), "long_mid": seek(L, L["exits"] // 2),
                  "long_early": seek(L, L["exits"] // 10)}
res["verify_ms"] = {"short": verify_ms(S), "long": verify_ms(L)}
res["replay_ms"] = {"short": full_replay(S), "long": full_replay(L)}
res["verify_ok"] = {"short": verify_ok(S), "long": verify_ok(L)}
json.dump(res, open(os.path.join(OUT, "long.json"), "w"), indent=1)

def per(x, secs, unit):  # bytes over secs of recording -> per unit
    return x / secs * unit
H, D = 3600, 86400
grow = L["log_bytes"] + L["console_bytes"]
# Checkpoint storage a day would keep: the policy's count at a day's worth
# of checkpoints, at the mean size of the files kept now (older kept files
# are merges, so larger; this is an estimate, not a measurement).
every_s = float(EVERY[:-2]) / 1000 if EVERY.endswith("ms") else float(EVERY.rstrip("s"))
keep = int(KEEP) if KEEP else 16
def kept_count(n):
    if keep == 0: return n + 1
    c = 0
    for i in range(n + 1):
        if i == 0 or n - i < keep: c += 1; continue
        lvl = ((n - i) // keep).bit_length() - 1
        c += i % (1 << lvl) == 0
    return c
n_day = int(D / every_s)
day_kept = kept_count(n_day)
mean_kept = L["kept_bytes"] / max(1, L["kept"])
MB = 1e6
print(f"\nrevirt long recording, recorded {res['recorded']}, measured {res['date']} (now = {res['now']}): workload=idle hz={HZ} pages={PAGES}, "
      f"--checkpoint-every {EVERY}, --keep-checkpoints {res['keep']}; a line of serial input every 5 s")
print("| what | 10 s-class recording | long recording | note |")
print("|---|---|---|---|")
print(f"| guest run (wall) / recorder CPU | {S['wall_s']:.0f} s / {S['cpu_s']:.2f} s | {L['wall_s']:.0f} s / {L['cpu_s']:.2f} s | CPU = user+sys of the recorder |")
print(f"| exits / events / inputs | {S['exits']} / {S['events']} / {S['inputs']} | {L['exits']} / {L['events']} / {L['inputs']} | |")
print(f"| events.log + console.log | {(S['log_bytes']+S['console_bytes'])/1e3:.0f} KB | {grow/1e3:.0f} KB | |")
print(f"| log growth (events.log + console.log) per hour / per day | | {per(grow, L['seconds'], H)/MB:.1f} MB / {per(grow, L['seconds'], D)/MB:.0f} MB | goal <= 1 GB/day |")
print(f"| checkpoints taken / kept / dropped | {S['checkpoints']} / {S['kept']} / {S['dropped']} | {L['checkpoints']} / {L['kept']} / {L['dropped']} | |")
print(f"| checkpoint bytes on disk (kept) vs written (keeping all) | {S['kept_bytes']/1e3:.0f} / {S['checkpoint_bytes_written']/1e3:.0f} KB | {L['kept_bytes']/1e3:.0f} / {L['checkpoint_bytes_written']/1e3:.0f} KB | |")
print(f"| checkpoint storage per day: keeping all / retention (est.) | | {per(L['checkpoint_bytes_written'], L['seconds'], D)/MB:.0f} MB / {day_kept * mean_kept/MB:.1f} MB ({day_kept} files) | est.: policy's count x mean kept size |")
print(f"| whole recording on disk | {S['total_bytes']/1e3:.0f} KB | {L['total_bytes']/1e3:.0f} KB | |")
print(f"| seek `replay --to` 0.5 s before the end (new process, median of {REPS}) | {res['seek_ms']['short_late']:.0f} ms | {res['seek_ms']['long_late']:.0f} ms | same cost expected |")
print(f"| seek to the middle / to 10 % (long) | | {res['seek_ms']['long_mid']:.0f} / {res['seek_ms']['long_early']:.0f} ms | older points: sparser checkpoints |")
print(f"| `verify` (new process, median of {REPS}): reads and checks the whole log and every kept file | {res['verify_ms']['short']:.0f} ms | {res['verify_ms']['long']:.0f} ms | what a full check reads; a seek checks the index and its window |")
print(f"| full replay | {res['replay_ms']['short']:.0f} ms | {res['replay_ms']['long']:.0f} ms | idle time is skipped |")
print(f"| verify | {'intact' if res['verify_ok']['short'] else 'FAILED'} | {'intact' if res['verify_ok']['long'] else 'FAILED'} | thinned recording |")
print(f"JSON: {os.path.relpath(OUT)}/long.json")
PY
