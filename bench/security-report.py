#!/usr/bin/env python3
"""bench/run --security's report: per mode the median of each fio job over the rounds, and the
ratios auth/none and secure/none with the targets (issue 15: auth within 5 %, secure within 15 %)."""
import glob
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import JOBS, JOB_TITLES, UNIT, fio_result, headline  # noqa: E402

out, mode, runtime, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
raw = os.path.join(out, "raw")
values = {}
for security in ("none", "auth", "secure"):
    for job in JOBS:
        runs = []
        for path in sorted(glob.glob(os.path.join(raw, f"fio-sec-{security}-r*-{job}.json"))):
            r = fio_result(path)
            if r:
                runs.append(headline(job, r))
        values[(security, job)] = runs
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print("# What replica-traffic security costs: (c) 3 replicas on the test bed\n")
print(f"{mode} run, {runtime} s per fio job, {rounds} interleaved rounds of none → auth → secure, a fresh bed per"
      f" mode and round; commit `{commit}`; {os.cpu_count()} cores. Medians; every round in brackets.\n")
print("| mode | " + " | ".join(f"{JOB_TITLES[j]} ({UNIT[j]})" for j in JOBS) + " |")
print("|---" * (len(JOBS) + 1) + "|")
for security in ("none", "auth", "secure"):
    cells = []
    for job in JOBS:
        runs = values[(security, job)]
        cells.append(f"{statistics.median(runs):,.0f} [{', '.join(f'{v:,.0f}' for v in runs)}]" if runs else "–")
    print(f"| {security} | " + " | ".join(cells) + " |")
print("\n| ratio (medians) | " + " | ".join(JOB_TITLES[j] for j in JOBS) + " |")
print("|---" * (len(JOBS) + 1) + "|")
for security, target in (("auth", 0.95), ("secure", 0.85)):
    cells = []
    for job in JOBS:
        a, b = values[(security, job)], values[("none", job)]
        if not a or not b or statistics.median(b) == 0:
            cells.append("–")
            continue
        ratio = statistics.median(a) / statistics.median(b)
        cells.append(f"{ratio:.2f}× (≥ {target}×: {'**met**' if ratio >= target else '**not met**'})")
    print(f"| {security}/none | " + " | ".join(cells) + " |")
failed = sorted(glob.glob(os.path.join(raw, "failed-*.txt")))
if failed:
    print("\n**Rounds with a failure** (a failed fio run's numbers are missing from the medians):\n")
    for path in failed:
        with open(path) as f:
            print(f"- `{os.path.basename(path)[len('failed-'):-4]}`: {f.read().strip()}")
