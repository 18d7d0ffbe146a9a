#!/usr/bin/env python3
"""bench/run --security / --metrics / --encryption: the report of (c) run in several modes on fresh beds, the
modes interleaved for some rounds. Per mode the median of each fio job over the rounds, and each
mode's ratio to the base mode with its target.

    modes-report.py OUT MODE RUNTIME ROUNDS --title T --prefix P --modes a,b,c --target b=0.95 ...

OUT/raw holds fio-P-<mode>-r<round>-<job>.json; the first mode is the base."""
import argparse
import glob
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import JOBS, JOB_TITLES, UNIT, fio_result, headline  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("mode")
parser.add_argument("runtime")
parser.add_argument("rounds", type=int)
parser.add_argument("--title", required=True)
parser.add_argument("--prefix", required=True)
parser.add_argument("--modes", required=True)
parser.add_argument("--target", action="append", default=[], help="MODE=RATIO: the least ratio to the base mode")
parser.add_argument("--note", default="")
args = parser.parse_args()

modes = args.modes.split(",")
base = modes[0]
targets = {m: float(r) for m, r in (t.split("=", 1) for t in args.target)}
raw = os.path.join(args.out, "raw")
values = {}
for m in modes:
    for job in JOBS:
        runs = []
        for path in sorted(glob.glob(os.path.join(raw, f"fio-{args.prefix}-{m}-r*-{job}.json"))):
            r = fio_result(path)
            if r:
                runs.append(headline(job, r))
        values[(m, job)] = runs
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"# {args.title}\n")
print(f"{args.mode} run, {args.runtime} s per fio job, {args.rounds} interleaved rounds of {' → '.join(modes)}, a fresh"
      f" bed per mode and round; commit `{commit}`; {os.cpu_count()} cores. Medians; every round in brackets.\n")
if args.note:
    print(args.note + "\n")
print("| mode | " + " | ".join(f"{JOB_TITLES[j]} ({UNIT[j]})" for j in JOBS) + " |")
print("|---" * (len(JOBS) + 1) + "|")
for m in modes:
    cells = []
    for job in JOBS:
        runs = values[(m, job)]
        cells.append(f"{statistics.median(runs):,.0f} [{', '.join(f'{v:,.0f}' for v in runs)}]" if runs else "–")
    print(f"| {m} | " + " | ".join(cells) + " |")
print("\n| ratio (medians) | " + " | ".join(JOB_TITLES[j] for j in JOBS) + " |")
print("|---" * (len(JOBS) + 1) + "|")
summary = {}
for m in modes[1:]:
    cells = []
    target = targets.get(m)
    for job in JOBS:
        a, b = values[(m, job)], values[(base, job)]
        if not a or not b or statistics.median(b) == 0:
            cells.append("–")
            continue
        ratio = statistics.median(a) / statistics.median(b)
        summary[f"{m}/{base} {job}"] = round(ratio, 3)
        if target is None:
            cells.append(f"{ratio:.2f}×")
        else:
            cells.append(f"{ratio:.2f}× (≥ {target}×: {'**met**' if ratio >= target else '**not met**'})")
    print(f"| {m}/{base} | " + " | ".join(cells) + " |")
failed = sorted(glob.glob(os.path.join(raw, "failed-*.txt")))
if failed:
    print("\n**Rounds with a failure** (a failed fio run's numbers are missing from the medians):\n")
    for path in failed:
        with open(path) as f:
            print(f"- `{os.path.basename(path)[len('failed-'):-4]}`: {f.read().strip()}")
with open(os.path.join(args.out, "latest.json"), "w") as f:
    json.dump({"modes": modes, "ratios": summary,
               "medians": {f"{m} {j}": (statistics.median(v) if v else None) for (m, j), v in values.items()}}, f, indent=1)
