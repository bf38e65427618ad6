"""Benchmark torch.empty + del pairs: the native allocator vs tessera through the torch adaptor
and as a plain plug-in, one process each (the allocator swap is one-way). Reports microseconds
per pair and the ratios; it fails only if a child fails, not on speed.
"""

import json
import statistics
import sys
import time

from gpu_util import check, note, pin_children, run_json

SIZES = [("512B", 512), ("64KiB", 64 << 10), ("1MiB", 1 << 20), ("64MiB", 64 << 20)]
ITERS = 10_000
REPEATS = 3  # per process: the median
PROCESSES = 3  # per allocator, alternated: the median of their medians, and their spread
PATHS = ("adaptor", "plug-in")  # tessera's two ways into PyTorch


def child(which):
    if which in PATHS:
        import tessera_torch
        got = tessera_torch.install(adaptor=which == "adaptor")
        if got != which:
            raise SystemExit(f"installed as {got}, not {which}")
    import torch
    torch.cuda.init()
    out = {}
    for name, n in SIZES:
        for _ in range(100):  # warm the cache
            x = torch.empty(n, dtype=torch.uint8, device="cuda")
            del x
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            for _ in range(ITERS):
                x = torch.empty(n, dtype=torch.uint8, device="cuda")
                del x
            times.append((time.perf_counter() - t0) / ITERS * 1e6)
        out[name] = statistics.median(times)
    torch.cuda.synchronize()
    print(json.dumps({"allocator": which, "us_per_pair": out}))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        child(sys.argv[1])
        sys.exit(0)
    # Alternate them (ABC ABC ABC): the machine's own noise between processes is larger than
    # many differences measured.
    print(f"every process on CPU {pin_children(1)}")
    runs = {}
    for which in ("native", *PATHS) * PROCESSES:
        summary, proc = run_json([sys.executable, __file__, which], timeout=85)
        check(proc.returncode == 0, f"{which} benchmark exited {proc.returncode}")
        for name, us in summary["us_per_pair"].items():
            runs.setdefault(which, {}).setdefault(name, []).append(us)
    med = {w: {n: statistics.median(v) for n, v in r.items()} for w, r in runs.items()}
    print(f"median of {PROCESSES} processes each (each the median of {REPEATS} x {ITERS} pairs); "
          "spread is min-max over the processes")
    print(f"{'size':>6} {'native us':>16} " + " ".join(f"{p + ' us':>16} {'ratio':>6}" for p in PATHS))
    ratios = {p: [] for p in PATHS}

    def cell(w, name):
        v = runs[w][name]
        return f"{med[w][name]:6.2f} ({min(v):.2f}-{max(v):.2f})"

    for name, _ in SIZES:
        a = med["native"][name]
        cells = []
        for p in PATHS:
            b = med[p][name]
            ratios[p].append(f"{name} {b / a:.2f}x")
            cells.append(f"{cell(p, name):>16} {b / a:6.2f}")
        print(f"{name:>6} {cell('native', name):>16} " + " ".join(cells))
    note("median time per pair / native's: " + "; ".join(f"{p} " + ", ".join(ratios[p]) for p in PATHS))
    print("BENCH OK")
