#!/usr/bin/env python3
"""Where the slow writes of a volume wait (docs/engine.md, "The slow commits of three replicas").

usage: bench/commit-tail.py TRACE [THRESHOLD_US]

TRACE is `perf script -F comm,tid,cpu,time,event,trace` output of a `perf record -a` with the
tracepoints fuse:fuse_request_send, fuse:fuse_request_end, sched:sched_switch,
sched:sched_wakeup, block:block_rq_issue and block:block_rq_complete, taken while fio runs on a
Cairn volume (e.g. during `bench/profile --job fsync`). Every FUSE WRITE is timed from its send
to its end; for the writes slower than THRESHOLD_US (default 250) and for a sample of those at
or under the median, it sums what ran on each CPU meanwhile (by thread name; "idle" when
nothing did), and prints the wake-up latency of the busiest threads and the disk's (254,0)
request latencies. A tail whose CPUs sit idle is the disk's; one whose CPUs are busy is the
machine's.
"""
import collections
import random
import re
import sys

LINE = re.compile(r"\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s+(.*)")
DISK = "254,0"


def parse(path):
    sends, writes, switches, sched, disk = {}, [], [], [], []
    with open(path) as f:
        for line in f:
            m = LINE.match(line)
            if not m:
                continue
            comm, _tid, cpu, t, event, text = m.groups()
            t, cpu = float(t) * 1e6, int(cpu)
            if event == "fuse:fuse_request_send":
                if "WRITE" in text or "opcode 16 " in text:
                    sends[re.search(r"req (\d+)", text).group(1)] = t
            elif event == "fuse:fuse_request_end":
                req = re.search(r"req (\d+)", text).group(1)
                if req in sends:
                    writes.append((sends.pop(req), t))
            elif event == "sched:sched_switch":
                nxt = re.search(r"next_comm=(.*?) next_pid=(\d+)", text)
                switches.append((t, cpu, nxt.group(1), nxt.group(2)))
                sched.append(("s", t, nxt.group(1), nxt.group(2)))
            elif event == "sched:sched_wakeup":
                woken = re.search(r"comm=(.*?) pid=(\d+)", text)
                if woken:
                    sched.append(("w", t, woken.group(1), woken.group(2)))
            elif event.startswith("block:"):
                p = text.split()
                sector = re.search(r"\) (\d+) \+", text)
                if p and p[0] == DISK and sector:
                    disk.append((t, event.split(":")[1], p[1], sector.group(1), comm))
    return sorted(writes), switches, sched, disk


def name(task):
    return "idle" if task.startswith("swapper") else task


def occupancy(running, t0, t1):
    busy = collections.Counter()
    for spans in running.values():
        for a, b, task in spans:
            if a < t1 and b > t0:
                busy[name(task)] += min(b, t1) - max(a, t0)
    return busy


def quantiles(values):
    v = sorted(values)
    n = len(v)
    return f"n {n}, p50 {v[n // 2]:.0f}, p90 {v[9 * n // 10]:.0f}, p99 {v[99 * n // 100]:.0f}, mean {sum(v) / n:.1f}" if n else "none"


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    threshold = float(sys.argv[2]) if len(sys.argv) == 3 else 250
    writes, switches, sched, disk = parse(sys.argv[1])
    if not writes:
        sys.exit("commit-tail: no FUSE WRITE requests in the trace (were the fuse tracepoints recorded?)")
    times = sorted(e - s for s, e in writes)
    median = times[len(times) // 2]
    print(f"FUSE writes (µs, send → end): {quantiles(times)}")
    slow = [w for w in writes if w[1] - w[0] > threshold]
    fast = [w for w in writes if w[1] - w[0] <= median]
    print(f"slower than {threshold:.0f} µs: {len(slow) / len(writes):.1%}; their time over the median, per write: "
          f"{sum(e - s - median for s, e in slow) / len(writes):.1f} µs")

    running, current = collections.defaultdict(list), {}
    for t, cpu, task, _pid in switches:
        if cpu in current:
            running[cpu].append((current[cpu][0], t, current[cpu][1]))
        current[cpu] = (t, task)
    random.seed(1)
    samples = {"slow": slow[:400], "fast": random.sample(fast, min(400, len(fast)))}
    totals = {}
    for kind, chosen in samples.items():
        total = collections.Counter()
        for s, e in chosen:
            total.update(occupancy(running, s, e))
        totals[kind] = (total, max(len(chosen), 1))
    print("\nCPU time during a write, summed over the CPUs (µs per write):")
    print(f"  {'thread':28s} {'slow':>8s} {'fast':>8s}")
    slow_total, ns = totals["slow"]
    fast_total, nf = totals["fast"]
    for task in sorted(set(slow_total) | set(fast_total), key=lambda k: -(slow_total[k] / ns + fast_total[k] / nf))[:16]:
        print(f"  {task:28s} {slow_total[task] / ns:8.1f} {fast_total[task] / nf:8.1f}")

    pending, latency = {}, collections.defaultdict(list)
    for kind, t, task, pid in sched:  # in the trace's order (perf script sorts by time)
        if kind == "w":
            pending[pid] = (t, task)
        elif pid in pending:
            t0, woken = pending.pop(pid)
            latency[re.sub(r"/\d+$", "", woken)].append(t - t0)
    print("\nwake-up → running (µs), the most woken threads:")
    for task, values in sorted(latency.items(), key=lambda x: -len(x[1]))[:8]:
        print(f"  {task:20s} {quantiles(values)}")

    # A flush carries no sector (its issue says 0, its completion -1): the block layer runs one
    # at a time, so they complete in the order they were issued.
    issued, flushes, done, issuers = {}, collections.deque(), collections.defaultdict(list), collections.Counter()
    for t, event, rwbs, sector, comm in disk:
        if event == "block_rq_issue":
            issuers[(re.sub(r"[/:]\d.*", "", comm), rwbs)] += 1
            if rwbs.startswith("F"):
                flushes.append(t)
            else:
                issued[(rwbs, sector)] = t
        elif rwbs.startswith("F"):
            if flushes:
                done[rwbs].append(t - flushes.popleft())
        elif (rwbs, sector) in issued:
            done[rwbs].append(t - issued.pop((rwbs, sector)))
    print(f"\nthe disk ({DISK}): requests by kind, issue → complete (µs)")
    for rwbs, values in sorted(done.items()):
        print(f"  {rwbs:4s} {quantiles(values)}")
    print("  issued by: " + ", ".join(f"{c} {r} {n}" for (c, r), n in issuers.most_common(8)))


if __name__ == "__main__":
    main()
