"""Compares tessera configurations on every sim trace (a tool): how policies are chosen.

    python3 tests/sim/sweep.py [--conf STRING ...] [--seeds N] [--replay PATH]

For each configuration (TESSERA_CONF syntax; '' is the defaults), replays with --frontier the
traces of tests/data, the churn trace (seed 0, once and four times in one process), the GPU
KV-cache workload's trace (six runs, as bench_time.py times it), the 64-streams-in-turn trace
(five runs) and N multi-stream seeds, and prints one row per trace: OOM frontier / live,
reserved / live, map calls, and the sim's modelled driver time (what the calls would take on an
H100). The multi-stream seeds are summarized as means and maxima. Traces are generated into a temporary folder.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, os.pardir, os.pardir))
sys.path.insert(0, HERE)

import churn_trace  # noqa: E402
import kv_trace  # noqa: E402
import manystream_trace  # noqa: E402
import multistream_trace  # noqa: E402


def write(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def repeated(lines, runs):
    """The same trace `runs` times in one process, each run's addresses apart."""
    out = []
    for r in range(runs):
        for line in lines:
            op, addr, size, stream = line.split()
            out.append("%s %d %s %s" % (op, int(addr) + (r << 40), size, stream))
    return out


def replay(exe, trace, conf):
    cmd = [exe, trace, "--frontier"] + (["--conf", conf] if conf else [])
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conf", action="append", help="a configuration (repeatable; default: the defaults)")
    p.add_argument("--seeds", type=int, default=24, help="multi-stream seeds (default 24)")
    p.add_argument("--replay", default=os.path.join(REPO, "target", "release", "tessera-replay"))
    a = p.parse_args()
    confs = a.conf or [""]
    with tempfile.TemporaryDirectory() as tmp:
        churn = churn_trace.trace(0)
        traces = sorted(os.path.join(REPO, "tests", "data", f) for f in os.listdir(os.path.join(REPO, "tests", "data")))
        traces += [write(os.path.join(tmp, "churn.trace"), churn),
                   write(os.path.join(tmp, "churn_x4.trace"), repeated(churn, 4)),
                   write(os.path.join(tmp, "kv_x6.trace"), kv_trace.trace(0, runs=6)),
                   write(os.path.join(tmp, "manystream.trace"), manystream_trace.trace(0))]
        seeds = [write(os.path.join(tmp, "ms%d.trace" % s), multistream_trace.trace(s)) for s in range(a.seeds)]
        for conf in confs:
            print("== conf %r" % conf)
            print("%-24s %9s %9s %8s %10s" % ("trace", "frontier", "reserved", "maps", "driver ms"))
            for t in traces:
                d = replay(a.replay, t, conf)
                print("%-24s %9.4f %9.4f %8d %10.1f" % (os.path.basename(t), d["frontier_ratio"], d["reserved_ratio"],
                                                       d["driver_map_calls"], d["modelled_driver_ms"]))
            if seeds:
                rows = [replay(a.replay, t, conf) for t in seeds]
                fr = [d["frontier_ratio"] for d in rows]
                rs = [d["reserved_ratio"] for d in rows]
                print("%d multi-stream seeds: frontier mean %.4f max %.4f; reserved mean %.4f max %.4f; maps %d; "
                      "driver %.1f ms" % (len(rows), sum(fr) / len(fr), max(fr), sum(rs) / len(rs), max(rs),
                                          sum(d["driver_map_calls"] for d in rows),
                                          sum(d["modelled_driver_ms"] for d in rows)))


if __name__ == "__main__":
    main()
