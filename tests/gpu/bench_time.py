"""Wall time of bench_frontier's workloads, tessera against PyTorch's allocators, side by side
(a benchmark, not a test): where memory is plentiful, does tessera's growth and recycling cost time?

    python3 tests/gpu/bench_time.py [--workloads kvcache,churn,multistream] [--runs 5]
        [--allocators native,tessera] [--lib NAME=PATH ...]

Each (allocator, workload) pair is its own process: one warm-up run (kernels load, the cache
fills), then --runs timed runs of the workload, the cache kept between runs as a serving
process keeps it (no empty_cache). Prints the median seconds per run and each one's ratio to
native's (above 1: slower); for tessera builds also the seconds spent in driver calls
(the driver_ns counter; 0 for builds older than it) and the map and unmap calls per run.
--lib NAME=PATH adds a tessera build under NAME (say, an older
commit's libtessera.so), so two builds can be timed in the same run.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gpu_util import REPO, last_json  # noqa: E402

PEERS = {"native": None, "expandable": "expandable_segments:True", "async": "backend:cudaMallocAsync"}


def child(which, workload, runs, lib):
    if lib:
        import tessera_torch
        tessera_torch.install(lib_path=lib)
    import torch
    import bench_frontier
    wl = bench_frontier.WORKLOADS[workload]
    wl(torch, 0, 1.0)
    torch.cuda.synchronize()
    times, driver = [], []  # per run: seconds; tessera's driver seconds, map and unmap calls
    for _ in range(runs):
        before = tessera_torch.stats() if lib else None
        t0 = time.perf_counter()
        wl(torch, 0, 1.0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if lib:
            after = tessera_torch.stats()
            driver.append([(after.get("driver_ns", 0) - before.get("driver_ns", 0)) / 1e9,
                           after["driver_map_calls"] - before["driver_map_calls"],
                           after["driver_unmap_calls"] - before["driver_unmap_calls"]])
    print(json.dumps({"allocator": which, "workload": workload, "times": times, "driver": driver}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="kvcache,churn,multistream")
    p.add_argument("--allocators", default="native,tessera")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--lib", action="append", default=[], help="NAME=PATH: another tessera build")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        which, workload, lib = a.child
        return child(which, workload, a.runs, lib if lib != "-" else None)
    libs = {"tessera": os.environ.get("TESSERA_LIB") or os.path.join(REPO, "target", "release", "libtessera.so")}
    for spec in a.lib:
        name, _, path = spec.partition("=")
        libs[name] = os.path.abspath(path)
    names = [x for x in a.allocators.split(",") if x] + [n for n in libs if n != "tessera"]
    rows = {}
    for workload in a.workloads.split(","):
        for which in names:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "python"), os.path.join(REPO, "examples"), HERE]))
            env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
            if PEERS.get(which):
                env["PYTORCH_CUDA_ALLOC_CONF"] = PEERS[which]
            lib = libs.get(which, "-")
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--runs", str(a.runs),
                                   "--child", which, workload, lib], env=env, capture_output=True, text=True,
                                  timeout=600)
            r = last_json(proc.stdout)
            if r is None:
                print(f"{workload} {which}: failed: {proc.stderr.strip()[-500:]}", flush=True)
                continue
            rows[(workload, which)] = statistics.median(r["times"])
            drv = ""
            if r["driver"]:
                d = sorted(r["driver"])[len(r["driver"]) // 2]
                drv = f"  in driver calls {d[0]:.3f} s ({d[1]} maps, {d[2]} unmaps, median run)"
            print(f"{workload:12} {which:12} median {rows[(workload, which)]:.3f} s  runs {[round(t, 3) for t in r['times']]}{drv}",
                  flush=True)
    print("\n| workload | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for workload in a.workloads.split(","):
        base = rows.get((workload, "native"))
        cells = []
        for which in names:
            t = rows.get((workload, which))
            cells.append("-" if t is None else f"{t:.3f} s" + (f" ({t / base:.2f}x)" if base and which != "native" else ""))
        print(f"| {workload} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
