"""Warm passes on the sim: what a policy costs once the pool is filled (a tool).

    python3 tests/sim/warm.py [--conf STRING ...] [--passes 3]    # after cargo build --release

bench_time.py times warm runs on the GPU: the cache kept between runs of one workload. This
replays each trace of tests/data once and --passes times in a row (each pass's leftovers freed
before the next, its addresses moved apart), and gives per warm pass (the difference, divided by
passes - 1) the modelled driver time on the callers' threads and on the driver thread (the sim's
H200 costs; with driver_thread:true the replay runs the thread's rounds after each event), the
map and create calls, and peak reserved over peak live of the whole replay.
"""

import argparse
import gzip
import json
import os
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
REPLAY = os.path.join(REPO, "target", "release", "tessera-replay")
DATA = os.path.join(REPO, "tests", "data")


def events(path):
    with gzip.open(path, "rt") as f:
        return [line.split() for line in f if line[:1] in ("a", "f")]


def passes(evs, n):
    """The trace `n` times, each pass's addresses moved by 2^50 and its leftovers freed after it."""
    out = []
    for k in range(n):
        live = {}
        for action, addr, size, stream in evs:
            a = int(addr) + (k << 50)
            out.append(f"{action} {a} {size} {stream}")
            if action == "a":
                live[a] = (size, stream)
            else:
                live.pop(a, None)
        out.extend(f"f {a} {size} {stream}" for a, (size, stream) in live.items())
    return "\n".join(out) + "\n"


def replay(path, conf):
    out = subprocess.run([REPLAY, path, "--conf", conf], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conf", action="append", default=None, help="tessera configuration (repeatable)")
    p.add_argument("--passes", type=int, default=3)
    a = p.parse_args()
    confs = a.conf or ["", "driver_thread:true"]
    names = sorted(f for f in os.listdir(DATA) if f.endswith(".trace.gz"))
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name in names:
            evs = events(os.path.join(DATA, name))
            files[name] = []
            for n in (1, a.passes):
                path = os.path.join(tmp, f"{name}.{n}")
                with open(path, "w") as f:
                    f.write(passes(evs, n))
                files[name].append(path)
        for conf in confs:
            print(f"\nconf {conf!r}: per warm pass")
            print("| trace | callers' driver ms | driver thread ms | maps | creates | reserved / live |")
            print("|---|---|---|---|---|---|")
            for name in names:
                one, many = (replay(f, conf) for f in files[name])
                per = lambda k: (many[k] - one[k]) / (a.passes - 1)  # noqa: E731
                bg = per("modelled_background_driver_ms")
                print(f"| {name} | {per('modelled_driver_ms') - bg:.1f} | {bg:.1f} | {per('driver_map_calls'):.0f} | "
                      f"{per('driver_create_calls'):.0f} | {many['reserved_ratio']:.4f} |")


if __name__ == "__main__":
    main()
