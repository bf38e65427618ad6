"""Benchmark torch.empty + del pairs: native allocator vs tessera, one process each
(the allocator swap is one-way). Reports microseconds per pair and the ratio; it fails
only if a child fails, not on speed.
"""

import json
import sys
import time

from gpu_util import check, note, run_json

SIZES = [("512B", 512), ("64KiB", 64 << 10), ("1MiB", 1 << 20), ("64MiB", 64 << 20)]
ITERS = 10_000
REPEATS = 3  # best of


def child(which):
    if which == "tessera":
        import tessera_torch
        tessera_torch.install()
    import torch
    torch.cuda.init()
    out = {}
    for name, n in SIZES:
        for _ in range(100):  # warm the cache
            x = torch.empty(n, dtype=torch.uint8, device="cuda")
            del x
        best = float("inf")
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            for _ in range(ITERS):
                x = torch.empty(n, dtype=torch.uint8, device="cuda")
                del x
            best = min(best, (time.perf_counter() - t0) / ITERS * 1e6)
        out[name] = best
    torch.cuda.synchronize()
    print(json.dumps({"allocator": which, "us_per_pair": out}))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        child(sys.argv[1])
        sys.exit(0)
    # Alternate the two (ABAB) and keep each one's best: the machine's own noise
    # between processes is larger than the difference measured.
    res = {}
    for which in ("native", "tessera", "native", "tessera"):
        summary, proc = run_json([sys.executable, __file__, which], timeout=85)
        check(proc.returncode == 0, f"{which} benchmark exited {proc.returncode}")
        prev = res.get(which)
        res[which] = {k: min(v, prev[k]) if prev else v for k, v in summary["us_per_pair"].items()}
    print(f"{'size':>6} {'native us':>10} {'tessera us':>11} {'ratio':>6}")
    ratios = []
    for name, _ in SIZES:
        a, b = res["native"][name], res["tessera"][name]
        ratios.append(f"{name} {b / a:.2f}x")
        print(f"{name:>6} {a:10.2f} {b:11.2f} {b / a:6.2f}")
    note("tessera/native time per pair: " + ", ".join(ratios))
    print("BENCH OK")
