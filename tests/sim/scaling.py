"""The replay scaling table: ns/event of tessera-replay as blocks and streams grow (a tool).

    python3 tests/sim/scaling.py [--max-live N]    # after cargo build --release; about two minutes

Writes the traces of fragment_trace.py (10,000 / 100,000 / 1,000,000 live blocks, seed 1)
and streams_trace.py (1,000 / 100,000 streams, seed 1) to a temporary folder, replays them
in five rounds (each round every trace once) on the sim backend (a device and address space
large enough for 2 TiB live), and prints a Markdown table of the median ns/event, with each
row's ratio to the first of its kind.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
REPLAY = os.path.join(REPO, "target", "release", "tessera-replay")
CONF = "backend:sim,device_capacity:8T,va_size:8T"
RUNS = 5


def replay(path):
    out = subprocess.run([REPLAY, path, "--conf", CONF], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-live", type=int, default=1_000_000, help="largest fragment trace (live blocks)")
    args = p.parse_args()
    cases = [("fragment_trace.py", n, f"{n:,} live blocks, fragmented") for n in (10_000, 100_000, 1_000_000)
             if n <= args.max_live]
    cases += [("streams_trace.py", n, f"{n:,} streams") for n in (1_000, 100_000)]
    print(f"| trace | events | ns/event (median of {RUNS}) | spread | vs the first of its kind |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for script, n, _ in cases:
            paths.append(os.path.join(tmp, f"{script}.{n}.trace"))
            subprocess.run([sys.executable, os.path.join(HERE, script), "1", paths[-1], str(n)], check=True)
        # Rounds over every case, so that the machine's drift falls on all rows alike.
        reports = [[] for _ in cases]
        for _ in range(RUNS):
            for i, path in enumerate(paths):
                reports[i].append(replay(path))
        first = {}
        for (script, n, label), runs in zip(cases, reports):
            if any(r["oom_at_event"] is not None for r in runs):
                sys.exit(f"{label}: the replay ran out of memory")
            ns = [r["ns_per_event"] for r in runs]
            med = statistics.median(ns)
            base = first.setdefault(script, med)
            print(f"| {label} | {runs[0]['events']:,} | {med:,.0f} | {min(ns):,.0f}-{max(ns):,.0f} | {med / base:.2f}x |")

if __name__ == "__main__":
    main()
