#!/usr/bin/env python3
"""Describes the machine and the run for bench/run's report (JSON on stdout).

usage: machine.py WORKDIR CAIRN MODE RUNTIME RAMP FILE_MIB CP_ITER FO_ITER ELAPSED
"""
import json
import os
import platform
import subprocess
import sys
import time


def run(*argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mem_total_gib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1048576, 1)
    return None


def disk(workdir):
    # The device and filesystem the work directory (limit file, replicas, bricks) lives on.
    fields = run("df", "--output=source,fstype", workdir).splitlines()
    source, fstype = fields[-1].split() if len(fields) > 1 else ("?", "?")
    name = os.path.basename(source)
    rotational = run("cat", f"/sys/block/{name}/queue/rotational")
    model = run("lsblk", "-dno", "MODEL", source)
    kind = {"0": "non-rotational", "1": "rotational (as reported; virtual disks often say so)"}.get(rotational, "unknown")
    return f"{source} ({fstype}, {kind}{', ' + model if model else ''})"


def main():
    workdir, cairn, mode, runtime, ramp, file_mib, cp_iter, fo_iter, elapsed = sys.argv[1:10]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = run("git", "-C", repo, "rev-parse", "--short", "HEAD")
    if run("git", "-C", repo, "status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    json.dump({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit,
        "cairn": cairn,
        "cairn_version": run(cairn, "--version"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": mem_total_gib(),
        "kernel": platform.release(),
        "disk": disk(workdir),
        "fio": run("fio", "--version"),
        "gluster": (run("glusterd", "--version").splitlines() or [""])[0],
        "loadavg_start": os.environ.get("BENCH_LOAD_START", "").split()[:3],
        "loadavg_end": open("/proc/loadavg").read().split()[:3],
        "mode": mode,
        "runtime_s": int(runtime),
        "ramp_s": int(ramp),
        "file_mib": int(file_mib),
        "control_plane_iterations": int(cp_iter),
        "failover_iterations": int(fo_iter),
        "elapsed_s": int(elapsed),
    }, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
