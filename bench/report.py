#!/usr/bin/env python3
"""bench/run's report: reads OUT/raw/ (fio JSON per job, pgbench output, cairn-bench JSON, RSS
samples, machine.json, failed-*.txt) and writes OUT/latest.json (the numbers), OUT/latest.md (the tables) and
OUT/latest.png (the chart; needs matplotlib).

usage: report.py OUT          the whole report
       report.py --one FILE   one fio result as a short line (bench/run's progress output)
"""
import json
import os
import re
import sys

JOBS = ["seqwrite", "seqread", "randwrite", "randread", "fsync"]
JOB_TITLES = {
    "seqwrite": "seq write 1 MiB QD8",
    "seqread": "seq read 1 MiB QD8",
    "randwrite": "random write 4 KiB QD32",
    "randread": "random read 4 KiB QD32",
    "fsync": "4 KiB write + fdatasync QD1",
}
# The headline metric of a job: MiB/s for the sequential jobs, IOPS otherwise.
UNIT = {"seqwrite": "MiB/s", "seqread": "MiB/s", "randwrite": "IOPS", "randread": "IOPS", "fsync": "IOPS"}
SYSTEMS = [
    ("limit", "(a) limit: ext4 on loop over a local file"),
    ("one", "(b) Cairn, one machine, 1 replica"),
    ("bed-r1", "(b') Cairn, test bed, 1 replica (FUSE engine)"),
    ("bed-r2", "(c2) Cairn, test bed, 2 replicas"),
    ("bed-r3", "(c) Cairn, test bed, 3 replicas (--data-security auth, the default)"),
    ("bed-r3-none", "(c none) 3 replicas on a fresh bed, replica traffic in plaintext"),
    ("bed-r3-auth", "(c auth) the same, authenticated (integrity-checked records)"),
    ("bed-r3-secure", "(c secure) the same, encrypted"),
    ("gluster", "(d) GlusterFS replica 3 (FUSE)"),
]
# (numerator, denominator) -> {job: target}; "≥" targets throughout. The bed rows' are issue 16's
# (its "Done when"; (c) sequential read and (c)/(d) sequential write are issue 5's).
TARGETS = {
    ("one", "limit"): {"seqwrite": 0.9, "seqread": 0.9, "randwrite": 0.45, "randread": 0.65, "fsync": 0.7},
    ("bed-r1", "limit"): {"seqwrite": 0.9, "randwrite": 0.7, "randread": 0.8, "fsync": 0.7},
    ("bed-r2", "limit"): {"seqwrite": 0.55, "randwrite": 0.21, "fsync": 0.41},
    ("bed-r3", "limit"): {"seqwrite": 0.5, "seqread": 0.6, "randwrite": 0.25, "randread": 0.8, "fsync": 0.4},
    ("bed-r3", "gluster"): {"seqwrite": 2.0, "randwrite": 3.0, "fsync": 3.0},
    # What authenticating (within 5%) and encrypting (within 15%) replica traffic may cost.
    ("bed-r3-auth", "bed-r3-none"): {job: 0.95 for job in ("seqwrite", "seqread", "randwrite", "randread", "fsync")},
    ("bed-r3-secure", "bed-r3-none"): {job: 0.85 for job in ("seqwrite", "seqread", "randwrite", "randread", "fsync")},
}
RATIO_NAMES = {
    ("one", "limit"): "(b)/(a)",
    ("bed-r1", "limit"): "(b')/(a)",
    ("bed-r2", "limit"): "(c2)/(a)",
    ("bed-r3", "limit"): "(c)/(a)",
    ("bed-r3", "gluster"): "(c)/(d)",
    ("bed-r3-auth", "bed-r3-none"): "(c auth)/(c none)",
    ("bed-r3-secure", "bed-r3-none"): "(c secure)/(c none)",
}


# Issue 16's other targets: pgbench tps ratios, and the (c) commit's added p50 over the limit.
PG_TARGETS = {"(c)/(a)": 0.5, "(c)/(d)": 3.0}
ADDED_P50_TARGET_US = 300

# pgbench runs on these (PGDATA in ext4 on each of (a), (b'), (c); on (d)'s mount itself).
PG_SYSTEMS = ["limit", "bed-r1", "bed-r3", "gluster"]
PG_RATIOS = [("bed-r1", "limit", "(b')/(a)"), ("bed-r3", "limit", "(c)/(a)"), ("gluster", "limit", "(d)/(a)"),
             ("bed-r3", "gluster", "(c)/(d)")]


def weighted_percentile(pairs, p):
    """Nearest-rank percentile of (value, count) pairs sorted by value."""
    total = sum(c for _, c in pairs)
    rank = max(1, -(-p * total // 100))
    seen = 0
    for value, count in pairs:
        seen += count
        if seen >= rank:
            return value
    return pairs[-1][0] if pairs else None


def pair_latency(write_bins, sync_bins):
    """p50/p99 (ns) of one write + fdatasync pair: the distribution of the sum of the write's
    completion latency and the fdatasync's latency, from fio's json+ histograms (each bin is a
    latency with about 1.6 % resolution and a count), combining every write bin with every sync
    bin — i.e. assuming a write's and the following fdatasync's latencies are independent."""
    w = [(int(k), c) for k, c in write_bins.items() if c]
    s = [(int(k), c) for k, c in sync_bins.items() if c]
    if not w or not s:
        return None
    combined = {}
    for wv, wc in w:
        for sv, sc in s:
            combined[wv + sv] = combined.get(wv + sv, 0) + wc * sc
    pairs = sorted(combined.items())
    return weighted_percentile(pairs, 50), weighted_percentile(pairs, 99)


def fio_result(path):
    """The headline numbers of one fio JSON file."""
    with open(path) as f:
        text = f.read()
    # fio may print warnings before the JSON document.
    job = json.loads(text[text.index("{"):])["jobs"][0]
    side = job["write"] if job["write"]["io_bytes"] > 0 else job["read"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    out = {
        "mib_s": side["bw_bytes"] / 1048576,
        "iops": side["iops"],
        "clat_p50_us": pct.get("50.000000", 0) / 1000,
        "clat_p99_us": pct.get("99.000000", 0) / 1000,
    }
    sync = job.get("sync", {})
    sync_pct = sync.get("lat_ns", {}).get("percentile", {})
    if sync.get("lat_ns", {}).get("N", 0) > 0 and sync_pct:
        out["fdatasync_p50_us"] = sync_pct.get("50.000000", 0) / 1000
        out["fdatasync_p99_us"] = sync_pct.get("99.000000", 0) / 1000
        # One write + fdatasync pair as the application sees it (psync: no submission latency,
        # the write's clat is the pwrite call). From the histograms (json+) when fio wrote them;
        # else the sum of the two percentiles (exact only if the two were perfectly correlated).
        pair = pair_latency(side.get("clat_ns", {}).get("bins", {}), sync["lat_ns"].get("bins", {}))
        if pair:
            out["pair_p50_us"], out["pair_p99_us"] = pair[0] / 1000, pair[1] / 1000
            out["pair_method"] = "histograms"
        else:
            out["pair_p50_us"] = out["clat_p50_us"] + out["fdatasync_p50_us"]
            out["pair_p99_us"] = out["clat_p99_us"] + out["fdatasync_p99_us"]
            out["pair_method"] = "sum of percentiles"
        # The mean pair, fio's own loop included: the job's time per write at QD1.
        out["pair_mean_us"] = 1e6 / side["iops"] if side["iops"] else None
    return out


def pgbench_result(path):
    """tps, mean latency, transactions and the init time from pgbench's output (plus our header)."""
    out = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("tps = "):
                out["tps"] = float(line.split()[2])
            elif line.startswith("latency average = "):
                out["latency_avg_ms"] = float(line.split()[3])
            elif line.startswith("number of transactions actually processed:"):
                out["transactions"] = int(line.split(":")[1].split("/")[0])
            elif line.startswith("number of failed transactions:"):
                out["failed_transactions"] = int(line.split(":")[1].split()[0])
            elif line.startswith("# init_seconds:"):
                out["init_s"] = float(line.split(":")[1])
            elif line.startswith("# pgbench on") and ": " in line:
                out["options"] = line.split(": ", 1)[1]
    return out if "tps" in out else None


def etcd_numbers(probe):
    """dbSize, dbSizeInUse, key count and revision from the scale stage's etcd probe."""
    if not isinstance(probe, dict):
        return {}
    status = probe.get("status") if isinstance(probe.get("status"), dict) else {}
    rng = probe.get("range") if isinstance(probe.get("range"), dict) else {}
    out = {}
    for key, name in (("dbSize", "db_bytes"), ("dbSizeInUse", "db_in_use_bytes")):
        if key in status:
            out[name] = int(status[key])
    if "revision" in status.get("header", {}):
        out["revision"] = int(status["header"]["revision"])
    if rng:
        out["keys"] = int(rng.get("count", 0))
    if isinstance(probe.get("db_file_bytes"), int):
        out["db_file_bytes"] = probe["db_file_bytes"]
    return out


def headline(job, r):
    return r["mib_s"] if UNIT[job] == "MiB/s" else r["iops"]


def fmt(v, digits=None):
    if v is None:
        return "–"
    if digits is None:
        digits = 0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2
    return f"{v:,.{digits}f}"


def signed(v):
    """A difference, with its sign (fmt's digits)."""
    return ("+" if v >= 0 else "−") + fmt(abs(v))


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def read_text(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def collect(raw):
    fio = {}
    for system, _ in SYSTEMS:
        for job in JOBS:
            path = os.path.join(raw, f"fio-{system}-{job}.json")
            if os.path.exists(path):
                fio.setdefault(system, {})[job] = fio_result(path)
    ratios = {}
    for (num, den), targets in TARGETS.items():
        name = RATIO_NAMES[(num, den)]
        for job in JOBS:
            a, b = fio.get(num, {}).get(job), fio.get(den, {}).get(job)
            if a is None or b is None or headline(job, b) == 0:
                continue
            value = headline(job, a) / headline(job, b)
            entry = {"value": value}
            if job in targets:
                entry["target"] = targets[job]
                entry["met"] = value >= targets[job]
            ratios.setdefault(name, {})[job] = entry
    control = {name[:-5]: load_json(os.path.join(raw, name))
               for name in ("cp-one-r1.json", "cp-bed-r1.json", "cp-bed-r3.json") if os.path.exists(os.path.join(raw, name))}
    rss = []
    if os.path.exists(os.path.join(raw, "rss.jsonl")):
        with open(os.path.join(raw, "rss.jsonl")) as f:
            rss = [json.loads(line) for line in f if line.strip()]
    gluster_skipped = read_text(os.path.join(raw, "gluster-skipped.txt"))
    # The QD1 write + fdatasync pair, and what each system adds to the limit's.
    latency = {}
    base = fio.get("limit", {}).get("fsync")
    for system, _ in SYSTEMS:
        r = fio.get(system, {}).get("fsync")
        if not r or "pair_p50_us" not in r:
            continue
        entry = {k: r.get(k) for k in ("pair_p50_us", "pair_p99_us", "pair_mean_us", "pair_method", "clat_p50_us",
                                       "clat_p99_us", "fdatasync_p50_us", "fdatasync_p99_us")}
        if base and "pair_p50_us" in base:
            entry["added_p50_us"] = r["pair_p50_us"] - base["pair_p50_us"]
            entry["added_p99_us"] = r["pair_p99_us"] - base["pair_p99_us"]
        latency[system] = entry
    stability = limit_stability(raw, fio)
    stores = {}
    for n in (1, 2, 3):
        r = store_rounds(os.path.join(raw, f"stores-r{n}.txt"))
        if r:
            stores[n] = r
    copies = {}
    for n in (1, 2, 3):
        path = os.path.join(raw, f"copies-r{n}.json")
        if os.path.exists(path):
            try:
                copies[n] = {"total_mib_s": fio_result(path)["mib_s"]}
            except (ValueError, KeyError, IndexError):
                pass
    pgbench = {}
    for system in PG_SYSTEMS:
        path = os.path.join(raw, f"pgbench-{system}.txt")
        if os.path.exists(path):
            r = pgbench_result(path)
            if r:
                pgbench[system] = r
    pg_ratios = {}
    for num, den, name in PG_RATIOS:
        if num in pgbench and den in pgbench and pgbench[den]["tps"]:
            pg_ratios[name] = pgbench[num]["tps"] / pgbench[den]["tps"]
    scale = load_json(os.path.join(raw, "scale.json"))
    if scale:
        # The numbers only (raw/scale.json keeps the probes' output and every sample).
        for b in scale.get("buckets", []):
            b["etcd"] = etcd_numbers(b.pop("probe", None))
        scale["etcd_before"] = etcd_numbers(scale.pop("probe_before", None))
        scale["etcd_after_delete"] = etcd_numbers(scale.pop("probe_after_delete", None))
        scale.pop("samples_ms", None)
    failed = {}
    for name in sorted(os.listdir(raw)) if os.path.isdir(raw) else []:
        if name.startswith("failed-") and name.endswith(".txt"):
            failed[name[len("failed-"):-4]] = read_text(os.path.join(raw, name))
    return {
        "machine": load_json(os.path.join(raw, "machine.json")) or {},
        "fio": fio,
        "ratios": ratios,
        "fsync_latency": latency,
        "pgbench": pgbench,
        "pgbench_ratios": pg_ratios,
        "pgbench_skipped": read_text(os.path.join(raw, "pgbench-skipped.txt")),
        "scale": scale,
        "failed_stages": failed,
        "control_plane": control,
        "failover": load_json(os.path.join(raw, "failover.json")),
        "resync": load_json(os.path.join(raw, "resync.json")),
        "restarts": load_json(os.path.join(raw, "restarts.json")),
        "rss_per_volume": load_json(os.path.join(raw, "rss-per-volume.json")),
        "rss_samples": rss,
        "gluster_skipped": gluster_skipped,
        "limit_stability": stability,
        "stores": stores,
        "copies": copies,
    }


# `cairn replica latency --durable` prints the commit rounds as
# "  4 KiB write + flush (durable write): p50 57 µs, p99 89 µs, mean 57 µs (17551 per second)".
STORE_LINE = re.compile(r"write \+ flush.*?: p50 (\d+) µs, p99 (\d+) µs, mean (\d+) µs \((\d+) per second\)")


def store_rounds(path):
    """N replica stores on this disk, 4 KiB durable writes in lockstep: p50, p99, mean, rounds/s."""
    text = read_text(path)
    m = STORE_LINE.search(text or "")
    if not m:
        return None
    p50, p99, mean, per_s = (int(g) for g in m.groups())
    return {"p50_us": p50, "p99_us": p99, "mean_us": mean, "per_s": per_s}


# The rows an N-store measurement bounds: the test bed's N-replica volumes.
STORE_ROWS = {1: "bed-r1", 2: "bed-r2", 3: "bed-r3"}


def bound_row(fio, n, job):
    """The N-replica bed row a disk's-share bound applies to: its label and its figure for `job`."""
    system = STORE_ROWS[n]
    row = fio.get(system, {}).get(job)
    return f"{dict(SYSTEMS)[system].split(' ')[0]} {n} replica{'s' if n > 1 else ''}", headline(job, row) if row else None


def table_head(title, intro, columns):
    """A report section's heading, its paragraph and the head of its table, as lines."""
    return [f"### {title}", "", intro, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def over_limit(bound, job, limit):
    """A bound over the limit (a)'s figure for `job`, as the report prints ratios."""
    return f"{bound / headline(job, limit):.2f}×" if limit and headline(job, limit) else "–"


# How far the limit (a) may move between the start and the end of a run before the run counts
# as disturbed: its ratios divide by a denominator that did not hold still.
DISTURBED_CHANGE = 0.25


def limit_stability(raw, fio):
    """The limit's random write and fsync jobs at the start and again at the end of the run."""
    jobs = {}
    for job in ("randwrite", "fsync"):
        path = os.path.join(raw, f"fio-limit-end-{job}.json")
        start = fio.get("limit", {}).get(job)
        if not start or not os.path.exists(path):
            continue
        end = fio_result(path)
        a, b = headline(job, start), headline(job, end)
        entry = {"start": a, "end": b, "change": (b - a) / a if a else None}
        if job == "fsync":
            entry["fdatasync_p99_us_start"] = start.get("fdatasync_p99_us")
            entry["fdatasync_p99_us_end"] = end.get("fdatasync_p99_us")
        jobs[job] = entry
    if not jobs:
        return None
    disturbed = [job for job, e in jobs.items() if e["change"] is None or abs(e["change"]) > DISTURBED_CHANGE]
    return {"jobs": jobs, "disturbed": bool(disturbed), "moved": disturbed, "threshold": DISTURBED_CHANGE}


def stability_lines(st):
    if not st:
        return []
    parts = []
    for job, e in st["jobs"].items():
        change = f"{e['change'] * 100:+.0f}%" if e["change"] is not None else "?"
        parts.append(f"{JOB_TITLES[job]} {fmt(e['start'])} → {fmt(e['end'])} {UNIT[job]} ({change})")
    measured = "; ".join(parts)
    if st["disturbed"]:
        return [f"- **⚠ Disturbed run: the limit (a) moved by more than {st['threshold'] * 100:.0f}% between the start and the end**"
                f" ({measured}). The machine's disk or CPUs changed speed while it ran, so the ratios below divide by a"
                " denominator that did not hold still: do not compare them with another run's. Run again when the machine is quiet."]
    return [f"- **Limit (a) at the start and the end of the run** {measured}: steady (within {st['threshold'] * 100:.0f}%)"]


def met(entry):
    if "target" not in entry:
        return ""
    return f" (≥ {entry['target']}×: {'**met**' if entry['met'] else '**not met**'})"


def memory_table(rss):
    """Peak VmRSS (MiB) per process and phase."""
    phases = {}
    for sample in rss:
        phase = sample["phase"]
        for name, kb in sample.items():
            if name == "phase" or kb is None:
                continue
            cur = phases.setdefault(phase, {})
            cur[name] = max(cur.get(name, 0), kb / 1024)
    return phases


def markdown(data, out):
    m = data["machine"]
    docs = os.path.relpath(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "bench.md"), out)
    lines = ["# Cairn benchmark: latest run", ""]
    if m:
        lines += [
            f"- **Date** {m.get('date')} · **commit** `{m.get('commit')}` · **binary** `{m.get('cairn_version')}` · **mode** {m.get('mode')}"
            f" ({m.get('runtime_s')} s per fio job + {m.get('ramp_s')} s ramp, {m.get('file_mib')} MiB file,"
            f" {m.get('control_plane_iterations')} control-plane iterations, {m.get('failover_iterations')} failovers; run took {m.get('elapsed_s')} s)",
            f"- **Machine** {m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gib')} GiB RAM, Linux {m.get('kernel')}",
            f"- **Disk** (limit file, replicas, bricks) {m.get('disk')}",
            f"- **Tools** {m.get('fio')}; {m.get('gluster') or 'GlusterFS not installed'}",
            f"- **Load average** at start {' '.join(m.get('loadavg_start') or [])}, at end {' '.join(m.get('loadavg_end') or [])}"
            " (other work on the machine skews every number: compare ratios from one run only)",
        ]
        lines += stability_lines(data.get("limit_stability"))
        lines += [""]
    lines += [
        "All fio jobs use direct I/O on one file in the filesystem under test; (a)–(c) are ext4 on a loop device"
        " (direct I/O), (d) is the GlusterFS FUSE mount itself. Ratios are of MiB/s (sequential) or IOPS (random, fsync)"
        f" from this one run. See [docs/bench.md]({docs}) for how to read them.",
        "",
    ]
    if data["gluster_skipped"]:
        lines += [f"**(d) GlusterFS was not measured:** {data['gluster_skipped']}", ""]
    if data.get("failed_stages"):
        lines += ["**Stages that failed** (their rows are missing or partial below):", ""]
        lines += [f"- `{name}`: {why}" for name, why in data["failed_stages"].items()] + [""]

    # Data path: one table, a row per job.
    fio, ratios = data["fio"], data["ratios"]
    present = [(s, t) for s, t in SYSTEMS if s in fio]
    lines += ["## Data path (fio)", ""]
    lines += ["| system | " + " | ".join(JOB_TITLES[j] + f" ({UNIT[j]})" for j in JOBS) + " | fsync job write p99 / fdatasync p99 (µs) |"]
    lines += ["|---" * (len(JOBS) + 2) + "|"]
    for system, title in present:
        row = [title]
        for job in JOBS:
            r = fio[system].get(job)
            row.append(fmt(headline(job, r)) if r else "–")
        f = fio[system].get("fsync")
        row.append(f"{fmt(f['clat_p99_us'])} / {fmt(f.get('fdatasync_p99_us'))}" if f else "–")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "### Ratios and targets", ""]
    lines += ["| ratio | " + " | ".join(JOB_TITLES[j] for j in JOBS) + " |", "|---" * (len(JOBS) + 1) + "|"]
    for name in RATIO_NAMES.values():
        if name not in ratios:
            continue
        row = [name]
        for job in JOBS:
            e = ratios[name].get(job)
            row.append(f"{e['value']:.2f}×{met(e)}" if e else "–")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "![ratios to the limit](latest.png)", ""]

    # The commit path's latency.
    lat = data.get("fsync_latency", {})
    if lat:
        lines += ["### QD1 4 KiB write + fdatasync: latency of one pair", "",
                  "What an application waits for one 4 KiB write and its fdatasync (the fsync job, one at a time): the"
                  " distribution of write latency + fdatasync latency combined from fio's json+ histograms (taken as"
                  " independent); *added* is the difference to the limit (a). The mean is the job's time per pair"
                  " (1/IOPS, fio's loop included). µs.", "",
                  "| system | pair p50 | pair p99 | added p50 | added p99 | mean | write p50 / p99 | fdatasync p50 / p99 |",
                  "|---|---|---|---|---|---|---|---|"]
        for system, title in SYSTEMS:
            e = lat.get(system)
            if not e:
                continue
            approx = "≈ " if e.get("pair_method") != "histograms" else ""
            added = (signed(e["added_p50_us"]), signed(e["added_p99_us"])) if "added_p50_us" in e else ("–", "–")
            if system == "limit":
                added = ("(base)", "(base)")
            lines.append(f"| {title.split(':')[0] if system == 'limit' else title} | {approx}{fmt(e['pair_p50_us'])} | {approx}{fmt(e['pair_p99_us'])}"
                         f" | {added[0]} | {added[1]} | {fmt(e.get('pair_mean_us'))}"
                         f" | {fmt(e.get('clat_p50_us'))} / {fmt(e.get('clat_p99_us'))}"
                         f" | {fmt(e.get('fdatasync_p50_us'))} / {fmt(e.get('fdatasync_p99_us'))} |")
        if any(e.get("pair_method") != "histograms" for e in lat.values()):
            lines.append("")
            lines.append("≈: no histograms in that fio result (not json+): the sum of the two percentiles.")
        added = lat.get("bed-r3", {}).get("added_p50_us")
        if added is not None:
            lines += ["", f"Added p50 of (c) over (a): {signed(added)} µs (≤ {ADDED_P50_TARGET_US} µs:"
                          f" {'**met**' if added <= ADDED_P50_TARGET_US else '**not met**'})."]
        lines.append("")

    # What the disk allows each replicated row: the replica stores alone, in lockstep.
    stores = data.get("stores", {})
    limit_fsync = fio.get("limit", {}).get("fsync")
    if stores:
        lines += table_head("The disk's share: replica stores alone on this disk",
                            "N replica stores on this machine's disk (the test bed's nodes share it), 4 KiB durable writes in"
                            " lockstep with no network, FUSE or engine (`cairn replica latency --stores N --durable`): the"
                            " most write+fdatasync pairs per second an N-replica row can reach here. *Of the limit* is that"
                            " bound over the limit (a)'s pairs/s; *reached* is the row's pairs/s over the bound; *path* is the"
                            " row's mean pair minus the stores' mean round (what FUSE, the engine and the network add).",
                            ["row", "stores: rounds/s", "round p50 / p99 / mean (µs)", "of the limit", "row pairs/s",
                             "reached", "path (µs)"])
        for n in sorted(stores):
            st = stores[n]
            label, pairs = bound_row(fio, n, "fsync")
            bound = over_limit(st["per_s"], "fsync", limit_fsync)
            reached = f"{pairs / st['per_s']:.2f}" if pairs else "–"
            path = signed(1e6 / pairs - st["mean_us"]) if pairs else "–"
            lines.append(f"| {label} | {fmt(st['per_s'])}"
                         f" | {st['p50_us']} / {st['p99_us']} / {st['mean_us']} | {bound} | {fmt(pairs) if pairs else '–'}"
                         f" | {reached} | {path} |")
        lines.append("")

    # What the disk's bandwidth allows each replicated row's sequential write: N copies of every byte.
    copies = data.get("copies", {})
    limit_seq = fio.get("limit", {}).get("seqwrite")
    if copies:
        lines += table_head("The disk's share: N copies of every byte",
                            "N sequential writers at once on this machine's disk (fio, 1 MiB QD8, direct I/O, a file each):"
                            " on the test bed an N-replica row writes every byte N times to this one disk, so their total"
                            " MiB/s over N is the most sequential write that row can reach here, whatever FUSE, the engine"
                            " and the network cost. *Of the limit* is that bound over the limit (a)'s sequential write;"
                            " *reached* is the row's MiB/s over the bound. With a disk per replica the 1-writer figure bounds"
                            " every row.",
                            ["row", "N writers: total MiB/s", "per copy: the bound (MiB/s)", "of the limit", "row MiB/s",
                             "reached"])
        for n in sorted(copies):
            total = copies[n]["total_mib_s"]
            bound = total / n
            label, mib = bound_row(fio, n, "seqwrite")
            reached = f"{mib / bound:.2f}" if mib and bound else "–"
            lines.append(f"| {label} | {fmt(total)} | {fmt(bound)} | {over_limit(bound, 'seqwrite', limit_seq)}"
                         f" | {fmt(mib) if mib else '–'} | {reached} |")
        lines.append("")

    # The database.
    pg = data.get("pgbench", {})
    if pg or data.get("pgbench_skipped"):
        lines += ["## Database (pgbench)", ""]
    if data.get("pgbench_skipped"):
        lines += [f"**Not measured:** {data['pgbench_skipped']}", ""]
    if pg:
        options = next((r["options"] for r in pg.values() if r.get("options")), "")
        lines += ["PostgreSQL 15, TPC-B-like (`pgbench`'s built-in script), synchronous_commit on, fsync on, the rest"
                  " default; PGDATA in ext4 on (a), (b') and (c) (the fio volumes), on (d)'s GlusterFS mount itself"
                  + (f"; `pgbench {options.split(',')[0]}`" if options else "") + ".", "",
                  "| system | tps | latency avg (ms) | transactions (failed) | ratio to (a) | pgbench -i (s) |", "|---|---|---|---|---|---|"]
        titles = dict(SYSTEMS)
        base = pg.get("limit", {}).get("tps")
        for system in PG_SYSTEMS:
            r = pg.get(system)
            if not r:
                continue
            ratio = f"{r['tps'] / base:.2f}×" if base and system != "limit" else "–"
            lines.append(f"| {titles[system]} | {fmt(r['tps'])} | {fmt(r.get('latency_avg_ms'))} | {r.get('transactions', '–')}"
                         f" ({r.get('failed_transactions', 0)}) | {ratio} | {fmt(r.get('init_s'))} |")
        if data.get("pgbench_ratios"):
            lines += ["", "Ratios of tps: " + ", ".join(
                f"{k} **{v:.2f}×**" + (f" (≥ {PG_TARGETS[k]}×: {'**met**' if v >= PG_TARGETS[k] else '**not met**'})"
                                       if k in PG_TARGETS else "")
                for k, v in data["pgbench_ratios"].items()) + "."]
        lines.append("")

    # Control plane and failover.
    lines += ["## Control plane and failover", "",
              "Over one kept gRPC channel per endpoint (`cairn-bench`), sequentially; p50 / p99 in ms.", "",
              "| set-up | CreateVolume | DeleteVolume | publish chain, with mkfs | publish chain, no mkfs | unpublish chain |",
              "|---|---|---|---|---|---|"]
    titles = {"cp-one-r1": "one machine, 1 replica", "cp-bed-r1": "test bed, 1 replica", "cp-bed-r3": "test bed, 3 replicas"}
    for key, cp in data["control_plane"].items():
        cells = [f"{titles.get(key, key)} (n={cp['iterations']})"]
        for metric in ("create_volume", "delete_volume", "publish_chain_mkfs", "publish_chain", "unpublish_chain"):
            s = cp.get(metric, {})
            cells.append(f"{fmt(s.get('p50'))} / {fmt(s.get('p99'))}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    checks = []
    for key, cp in data["control_plane"].items():
        p50 = cp.get("create_volume", {}).get("p50")
        if p50 is not None:
            checks.append(f"CreateVolume p50 < 20 ms, {titles.get(key, key)}: {fmt(p50)} ms — {'**met**' if p50 < 20 else '**not met**'}")
        p50 = cp.get("publish_chain", {}).get("p50")
        if p50 is not None:
            checks.append(f"publish chain p50 < 1 s without mkfs, {titles.get(key, key)}: {fmt(p50)} ms — {'**met**' if p50 < 1000 else '**not met**'}")
    fo = data["failover"]
    if fo:
        s = fo["failover"]
        checks.append(
            f"failover < 5 s ({fo['replicas']} replicas, {fo['from']} SIGKILLed → staged, published and first O_DIRECT write on {fo['to']},"
            f" n={fo['iterations']}): p50 {fmt(s.get('p50'))} ms, max {fmt(s.get('max'))} ms — "
            f"{'**met**' if s.get('max', 1e9) < 5000 else '**not met**'} (judged on the slowest)")
        parts = [("ControllerUnpublish old", "controller_unpublish_old"), ("publish chain on the new node", "publish_chain_new"),
                 ("first write", "first_direct_write")]
        checks.append("failover steps, p50 ms: " + ", ".join(f"{t} {fmt(fo.get(k, {}).get('p50'))}" for t, k in parts))
    lines += [f"- {c}" for c in checks] + [""]

    sc = data.get("scale")
    if sc:
        mib = lambda v: f"{v / 2**20:.1f}" if isinstance(v, (int, float)) else "–"
        lines += ["### At scale", "",
                  f"{sc.get('created')} volumes of {sc.get('size_mib')} MiB, {sc.get('replicas')} replica each, created one after"
                  f" the other on the test bed; after every {sc.get('bucket')}: that bucket's CreateVolume p50 / p99, a full"
                  f" ListVolumes in pages of {sc.get('page_size')} (as a CO pages) and in one call, GetCapacity, and etcd's"
                  " database (dbSize / dbSizeInUse from its maintenance status) and key count. ms unless marked.", "",
                  "| volumes | CreateVolume p50 / p99 | ListVolumes, paged (pages) | ListVolumes, one call | GetCapacity p50 |"
                  " etcd db / in use (MiB) | etcd keys |", "|---|---|---|---|---|---|---|"]
        before = sc.get("etcd_before") or {}
        if before:
            lines.append(f"| 0 (before) | – | – | – | – | {mib(before.get('db_bytes'))} / {mib(before.get('db_in_use_bytes'))}"
                         f" | {before.get('keys', '–')} |")
        for b in sc.get("buckets", []):
            cv, e = b.get("create_volume", {}), b.get("etcd", {})
            lines.append(f"| {b['volumes']} | {fmt(cv.get('p50'))} / {fmt(cv.get('p99'))} | {fmt(b.get('list_paginated_ms'))}"
                         f" ({b.get('list_pages', '–')}) | {fmt(b.get('list_unpaginated_ms'))} | {fmt(b.get('get_capacity', {}).get('p50'))}"
                         f" | {mib(e.get('db_bytes'))} / {mib(e.get('db_in_use_bytes'))} | {e.get('keys', '–')} |")
        dv, after = sc.get("delete_volume", {}), sc.get("etcd_after_delete") or {}
        if dv.get("n"):
            lines += ["", f"Deleting all {sc.get('created')}: **{sc.get('delete_all_ms', 0) / 1000:.1f} s**, DeleteVolume p50"
                      f" {fmt(dv.get('p50'))} ms, p99 {fmt(dv.get('p99'))} ms; etcd afterwards {mib(after.get('db_bytes'))} MiB"
                      f" ({mib(after.get('db_in_use_bytes'))} in use), {after.get('keys', '–')} keys."]
        if sc.get("error") or sc.get("delete_failures"):
            lines += ["", f"**The scale stage did not finish:** {sc.get('error') or ''} {len(sc.get('delete_failures', []))} failed deletes."]
        lines.append("")

    # Recovery.
    rs = data.get("resync")
    if rs:
        ratio = rs["wire_over_changed"]
        lines += ["## Recovery (resync)", "",
                  "On the test bed, 3 replicas, engine on n1, nodes at `--rebuild-rate 0` (unthrottled). Bytes on the wire are"
                  " everything n3's interface received and sent while it caught up (control plane included)."
                  " `bench/run` measures this as its last test-bed stage; `bench/resync` measures it alone (then it comes"
                  " from a different run than the tables above).", "",
                  "| measurement | value |", "|---|---|",
                  f"| delta resync: {rs['changed_bytes'] / 2**20:.1f} MiB rewritten (random 4 KiB) in a {rs['volume_mib']} MiB volume"
                  f" holding {rs['fill_mib']} MiB while n3 was down | {rs['wire_bytes'] / 2**20:.1f} MiB on the wire ="
                  f" **{ratio:.2f}×** the changed bytes (≤ 1.5×: {'**met**' if ratio <= 1.5 else '**not met**'}); healthy"
                  f" {rs['delta_resync_seconds']:.1f} s after the restart |",
                  f"| full rebuild: {rs['rebuild_bytes'] / 2**20:.0f} MiB written while n3 was down | "
                  f"**{rs['rebuild_rate_bytes_per_second'] / 1e6:.0f} MB/s** on n3's wire (10%–90% of the copy); healthy"
                  f" {rs['rebuild_seconds']:.1f} s after the restart |", ""]

    # Restarts.
    restarts = data.get("restarts")
    if restarts:
        titles = {"engine": "the process running n1's engines (and its replica server)",
                  "node": "n1's CSI node process", "replica": "a replica node's process (n2)"}
        lines += ["## Restarts (issue 14)", "",
                  "One Cairn process SIGKILLed and started again while fio writes 4 KiB blocks (O_DIRECT|O_SYNC, QD1,"
                  " crc32c verification) to a staged 3-replica block volume on n1; the FUSE keeper holds n1's FUSE"
                  " connections meanwhile. The stall is the longest single write fio saw.", "",
                  "| restarted | writes | I/O errors | fio exit | stall (longest write) | p99 write | all replicas in sync after |",
                  "|---|---|---|---|---|---|---|"]
        for r in restarts:
            if r.get("hung"):
                lines.append(f"| {titles.get(r['kind'], r['kind'])} (`{r['process']}`) | – | – | – | **I/O hung** | – | – |")
                continue
            stall = r.get("longest_write_s")
            failed = r.get("io_errors", 0) != 0 or r.get("fio_exit", 0) != 0
            if failed:
                stall_cell = "**I/O failed** (no stall: the writer got errors)"
            else:
                stall_cell = f"**{fmt(stall, 3)} s**" + (" (≤ 2 s: met)" if stall is not None and stall <= 2 else " (≤ 2 s: **not met**)")
            lines.append(
                f"| {titles.get(r['kind'], r['kind'])} (`{r['process']}`) | {r.get('writes', '–')} | {r.get('io_errors', '–')}"
                f" | {r.get('fio_exit', '–')} | {stall_cell}"
                f" | {fmt(r.get('p99_write_ms'), 1)} ms | {fmt(r.get('in_sync_after_s'), 1) + ' s' if r.get('in_sync_after_s') is not None else '–'} |")
        lines.append("")
    pv = data.get("rss_per_volume")
    if pv:
        per = (pv["after_kib"] - pv["before_kib"]) / 1024 / pv["volumes"]
        lines += [f"Memory per staged idle 3-replica volume: **{per:.1f} MiB** added to `{pv['process']}` per volume"
                  f" ({pv['volumes']} volumes; {pv['before_kib'] / 1024:.0f} → {pv['after_kib'] / 1024:.0f} MiB;"
                  f" ≤ 10 MiB: {'**met**' if per <= 10 else '**not met**'}); the FUSE keeper: "
                  f"{fmt((pv.get('keeper_kib') or 0) / 1024, 1)} MiB.", ""]

    # Memory.
    phases = memory_table(data["rss_samples"])
    if phases:
        lines += ["## Memory (VmRSS, MiB; peak of the samples)", "",
                  "On the test bed each node process is the CSI node service, the agent and the replica server in one"
                  " (`--agent-socket none`), and n1 runs the 3-replica volume's FUSE engine; on one machine `--role all` is"
                  " controller, node and agent in one process.", ""]
        names = ["all", "controller", "n1", "n2", "n3"]
        lines += ["| phase | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        phase_titles = {"one-idle": "one machine, volume staged, idle", "bed-idle": "test bed, idle (no volume)",
                        "bed-staged-idle": "test bed, 3-replica volume staged on n1, idle",
                        "bed-fio-r3": "test bed, under the 3-replica fio jobs (1 s samples)",
                        "bed-after-idle": "test bed, the same volume idle again after fio and pgbench, past the idle trim"}
        for phase, values in phases.items():
            lines.append(f"| {phase_titles.get(phase, phase)} | " + " | ".join(fmt(values.get(n), 1) if n in values else "–" for n in names) + " |")
        lines.append("")
    lines += ["Raw data: [raw/](raw/) (fio JSON per system and job, `pgbench-*.txt`, `cp-*.json`, `scale.json`, `failover.json`,"
              " `resync.json`, `restarts.json`, `rss.jsonl`, `machine.json`, `failed-*.txt`)."]
    return "\n".join(lines) + "\n"


# Short legend entries: the tables have the long titles.
CHART_LABELS = {
    "one": "(b) one machine, 1 replica", "bed-r1": "(b') test bed, 1 replica", "bed-r2": "(c2) test bed, 2 replicas",
    "bed-r3": "(c) test bed, 3 replicas", "bed-r3-none": "(c none) plaintext", "bed-r3-auth": "(c auth) authenticated",
    "bed-r3-secure": "(c secure) encrypted", "gluster": "(d) GlusterFS replica 3",
}


def chart(data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fio = data["fio"]
    series = [(s, t) for s, t in SYSTEMS if s != "limit" and s in fio]
    if "limit" not in fio or not series:
        return False
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    width = 0.8 / len(series)
    colors = {"one": "#4c72b0", "bed-r1": "#8fb0d8", "bed-r2": "#e6c35c", "bed-r3": "#dd8452", "bed-r3-none": "#f0b48a", "bed-r3-auth": "#c8703a", "bed-r3-secure": "#a0522d",
              "gluster": "#8c8c8c"}
    for i, (system, title) in enumerate(series):
        xs, ys = [], []
        for j, job in enumerate(JOBS):
            r, base = fio[system].get(job), fio["limit"].get(job)
            if r and base and headline(job, base):
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                ys.append(headline(job, r) / headline(job, base))
        bars = ax.bar(xs, ys, width * 0.95, label=CHART_LABELS.get(system, title), color=colors.get(system))
        ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7, padding=1)
        targets = TARGETS.get((system, "limit"), {})
        for x, job in zip(xs, [j for j in JOBS if fio[system].get(j) and fio["limit"].get(j)]):
            if job in targets:
                ax.hlines(targets[job], x - width / 2, x + width / 2, colors="black", linewidth=2)
    ax.axhline(1.0, color="#444", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(JOBS)), [JOB_TITLES[j] for j in JOBS], fontsize=8)
    ax.set_ylabel("ratio to the limit (a) — higher is better")
    m = data["machine"]
    ax.set_title(f"Cairn vs the limit (ext4 on a loop device over a local file) — {m.get('date', '')}, {m.get('commit', '')},"
                 f" {m.get('cores', '?')} cores, {m.get('mode', '')} run", fontsize=9)
    ax.plot([], [], color="black", linewidth=2, label="target (the bed rows: issue 16)")
    # Below the axes: above the bars it would hide the tallest ones.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=5 if len(series) < 5 else 4, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    return True


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        r = fio_result(sys.argv[2])
        text = f"{fmt(r['mib_s'])} MiB/s, {fmt(r['iops'])} IOPS, p99 {fmt(r['clat_p99_us'])} µs"
        if "fdatasync_p99_us" in r:
            text += f", fdatasync p99 {fmt(r['fdatasync_p99_us'])} µs, write+fdatasync p50 {fmt(r['pair_p50_us'])} p99 {fmt(r['pair_p99_us'])} µs"
        print(text)
        return
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    data = collect(os.path.join(out, "raw"))
    with open(os.path.join(out, "latest.json"), "w") as f:
        json.dump({k: v for k, v in data.items() if k != "rss_samples"} | {"memory_mib": memory_table(data["rss_samples"])},
                  f, indent=2, sort_keys=True)
    with open(os.path.join(out, "latest.md"), "w") as f:
        f.write(markdown(data, out))
    if not chart(data, os.path.join(out, "latest.png")):
        print("report: no chart: the limit or every other system is missing", file=sys.stderr)


if __name__ == "__main__":
    main()
