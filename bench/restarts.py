#!/usr/bin/env python3
"""Restart stalls (issue 14): one Cairn process of the test bed is SIGKILLed and started again
while fio writes 4 KiB blocks with O_DIRECT|O_SYNC and crc32c verification to a staged
3-replica block volume; what the application sees is recorded: I/O errors, verify errors, the
longest single write (the stall), and for a replica node how long until all replicas are in sync
again.

    bench/restarts.py --testbed scripts/testbed --device /dev/... --out raw/restarts.json \
        --kind engine=n1 --kind replica=n2 [--kind node=n1-node] [--seconds 10] [--at 3]

KIND=PROCESS: the test bed name that `testbed kill`/`restart` take. The kinds run one after the
other on the same volume; `--cairn-bench` and `--controller` with `--volume` let the replica
kind wait for the volume's condition to be healthy again.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def fio(device, seconds, out):
    return subprocess.Popen([
        "fio", "--name=restart", f"--filename={device}", "--size=256M", "--rw=randwrite", "--bs=4k",
        "--direct=1", "--sync=1", "--ioengine=psync", "--iodepth=1",
        "--verify=crc32c", "--verify_backlog=256", "--verify_fatal=1", "--verify_state_save=0",
        f"--runtime={seconds}", "--time_based", "--output-format=json", f"--output={out}",
    ], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def healthy(args):
    """Whether ControllerGetVolume says the volume's condition is normal (cairn-bench csi)."""
    if not (args.cairn_bench and args.controller and args.volume):
        return True
    r = subprocess.run([args.cairn_bench, "csi", "condition", "--controller", args.controller, "--volume", args.volume],
                       capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip().startswith("normal")


def run_kind(args, kind, process):
    out = tempfile.mktemp(suffix=".json")
    job = fio(args.device, args.seconds, out)
    time.sleep(args.at)
    subprocess.run([args.testbed, "kill", process], check=True, capture_output=True)
    subprocess.run([args.testbed, "restart", process], check=True, capture_output=True)
    restarted = time.monotonic()
    in_sync_after = None
    if kind == "replica":
        deadline = restarted + 120
        time.sleep(0.5)
        while time.monotonic() < deadline:
            if healthy(args):
                in_sync_after = time.monotonic() - restarted
                break
            time.sleep(0.25)
    try:
        _, err = job.communicate(timeout=args.seconds + 120)
    except subprocess.TimeoutExpired:
        job.kill()
        return {"kind": kind, "process": process, "hung": True}
    result = {"kind": kind, "process": process, "fio_exit": job.returncode, "stderr": err.strip()[-400:]}
    try:
        with open(out) as f:
            text = f.read()
        data = json.loads(text[text.index("{"):])
        j = data["jobs"][0]
        w = j["write"]
        result.update({
            "writes": w["total_ios"], "io_errors": j.get("error", 0),
            "longest_write_s": w["clat_ns"]["max"] / 1e9,
            "p99_write_ms": w["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1e6,
        })
    except (OSError, ValueError, KeyError) as e:
        result["parse_error"] = str(e)
    finally:
        if os.path.exists(out):
            os.unlink(out)
    if in_sync_after is not None:
        result["in_sync_after_s"] = in_sync_after
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--testbed", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--kind", action="append", default=[])
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--at", type=float, default=3)
    p.add_argument("--cairn-bench")
    p.add_argument("--controller")
    p.add_argument("--volume")
    args = p.parse_args()
    results = []
    for spec in args.kind:
        kind, process = spec.split("=", 1)
        r = run_kind(args, kind, process)
        print(f"restarts: {kind} ({process}): {json.dumps(r)}", file=sys.stderr)
        results.append(r)
        time.sleep(2)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
