#!/usr/bin/env python3
"""Turns `perf report --sort pid,sym` of a bench/profile run into CPU microseconds per I/O, by
process and by stage of the data path (docs/engine.md, "Where the cycles go")."""
import argparse
import json
import re
import subprocess
from collections import defaultdict

# Stage of a symbol: the first rule whose pattern matches (kernel and demangled Swift names).
STAGES = [
    ("crypto (record layer)", r"chacha|poly1305|aes|gcm|EVP_|CRYPTO_|OPENSSL|SecureChannel|ossl_"),
    ("checksums", r"crc32c|CRC32C"),
    ("FUSE request in/out", r"fuse_|cfuse_|FUSEKeeper|fuse_session|fuse_reply|fuse_ll_"),
    ("loop device / block layer", r"^lo_|loop_|blk_|bio_|submit_bio|__blk|blkcg|bfq|dd_|mq_"),
    ("engine", r"CairnEngine|VolumeEngine|FanOut|LocalReplicaIO|engineWrite|engineRead|engineFlush"),
    ("replica client (fan-out)", r"ReplicaClient|ClientReplicaIO|CairnCluster"),
    ("replica server", r"ReplicaServer|FrameDecoder|Frame\b|CairnReplica\.Frame|handle\("),
    ("store (replica files)", r"ReplicaStore|BlockMap|Journal|RegionLocks|SharedExclusive|ext4|jbd2|iomap|filemap|page_cache|dio"),
    ("network (TCP/IP, veth)", r"tcp_|ip_|__ip|inet_|sock_|skb|veth|netif|__dev_queue|napi|net_rx|__netif|br_|nf_|__sys_sendmsg|__sys_recvfrom|sendmsg|recvmsg"),
    ("threads, locks, wake-ups", r"futex|schedule|__schedule|try_to_wake|pthread|swift_task|dispatch_|semaphore|Mutex|finish_task_switch|psi_"),
    ("memory", r"malloc|free|swift_allocObject|swift_release|swift_retain|memcpy|memmove|memset|clear_page|copy_user|_copy_|rep_movs"),
    ("syscall entry/exit", r"entry_SYSCALL|syscall_|do_syscall|__x64_sys|exit_to_user|syscall_exit"),
    ("idle", r"default_idle|cpu_idle|do_idle|acpi_idle|intel_idle|poll_idle|native_safe_halt|pv_native_safe_halt"),
]


def demangle(names):
    try:
        out = subprocess.run(["swift", "demangle", "--simplified", "--compact"], input="\n".join(names),
                             capture_output=True, text=True, timeout=60).stdout.splitlines()
        if len(out) == len(names):
            return out
    except Exception:
        pass
    return names


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--report", required=True)
    ap.add_argument("--fio", help="fio's JSON output: the I/Os counted")
    ap.add_argument("--transactions", type=int, help="instead of --fio: pgbench's transactions counted")
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--cpus", type=int, required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--replicas", required=True)
    ap.add_argument("--pids", default="")
    a = ap.parse_args()

    if a.fio:
        fio = json.load(open(a.fio))["jobs"][0]
        side = fio["write"] if fio["write"]["total_ios"] > 0 else fio["read"]
        ops = side["total_ios"]
        runtime = side["runtime"] / 1000.0 or a.seconds
        unit = "I/O"
        # fio's completion latency of the counted side (the write of a write+fdatasync pair).
        pct = side.get("clat_ns", {}).get("percentile", {})
        latency = (f"fio completion latency p50 {pct.get('50.000000', 0) / 1000:,.0f} µs, "
                   f"p99 {pct.get('99.000000', 0) / 1000:,.0f} µs, queue depth {fio.get('job options', {}).get('iodepth', '?')}\n"
                   if pct else "")
    else:
        ops, runtime, unit = a.transactions or 0, a.seconds, "transaction"
        latency = ""
    node_of = {}
    for pair in a.pids.split():
        node, tids = pair.split("=")
        for tid in tids.split(","):
            node_of[tid] = node

    rows = []
    line = re.compile(r"^\s*([0-9.]+)%\s+(\d+):(\S+)\s+\[(.)\]\s+(.*)$")
    for text in open(a.report, errors="replace"):
        m = line.match(text)
        if m:
            pct, pid, comm, space, sym = m.groups()
            rows.append((float(pct), pid, comm, space, sym.strip()))
    names = demangle([r[4] for r in rows])
    cpu_us_total = a.cpus * runtime * 1e6  # the samples cover every CPU for the whole run

    def who(pid, comm):
        if pid in node_of:
            node = node_of[pid]
            if node.endswith("-keeper"):
                return node + " (FUSE keeper)"
            return node + (" (engine + local replica)" if node == "n1" else " (replica server)")
        if comm.startswith("fio"):
            return "fio"
        if pid == "0":
            return "idle"
        if comm.startswith("kworker") or comm.startswith("loop") or comm.startswith("jbd2") or comm.startswith("ksoftirq"):
            return "kernel threads (" + comm.split("/")[0].rstrip("0123456789:") + ")"
        return "other (" + comm + ")"

    by_proc = defaultdict(float)
    by_stage = defaultdict(float)
    by_sym = defaultdict(float)
    for (pct, pid, comm, space, _), name in zip(rows, names):
        if who(pid, comm).startswith("other"):
            by_proc[who(pid, comm).split(" (")[0] + " (not Cairn)"] += pct / 100.0 * cpu_us_total / max(ops, 1)
            continue
        us = pct / 100.0 * cpu_us_total / max(ops, 1)
        p = who(pid, comm)
        by_proc[p] += us
        stage = "other"
        for label, pat in STAGES:
            if re.search(pat, name):
                stage = label
                break
        if p == "idle":
            stage = "idle"
        by_stage[stage] += us
        if p != "idle":
            by_sym[(p.split(" ")[0], name[:110])] += us

    # Other processes on the machine (builds, other tests) are listed but not counted.
    busy = sum(v for k, v in by_proc.items() if k != "idle" and not k.startswith("other"))
    print(f"# CPU per {unit}: {a.job}, {a.replicas} replica(s), {ops:,} {unit}s in {runtime:.1f} s "
          f"({ops / runtime:,.0f}/s; counted per {unit}), {a.cpus} CPUs sampled (perf cpu-clock)\n")
    if latency:
        print(latency)
    others = sum(v for k, v in by_proc.items() if k.startswith("other"))
    print(f"CPU per I/O in Cairn, fio and the kernel threads serving them: **{busy:,.1f} µs** "
          f"(idle {by_proc.get('idle', 0):,.1f} µs; other processes on the machine {others:,.1f} µs, not counted)\n")
    print("| process | µs CPU per I/O |\n|---|---|")
    for k, v in sorted(by_proc.items(), key=lambda kv: -kv[1]):
        if k != "idle" and not k.startswith("other") and v >= 0.5:
            print(f"| {k} | {v:,.1f} |")
    print("\n| stage (by symbol) | µs CPU per I/O |\n|---|---|")
    for k, v in sorted(by_stage.items(), key=lambda kv: -kv[1]):
        if k != "idle" and v >= 0.5:
            print(f"| {k} | {v:,.1f} |")
    print("\n| top symbols (process: symbol) | µs per I/O |\n|---|---|")
    for (p, s), v in sorted(by_sym.items(), key=lambda kv: -kv[1])[:25]:
        print(f"| {p}: `{s}` | {v:,.1f} |")


if __name__ == "__main__":
    main()
