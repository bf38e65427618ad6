"""Does the allocator change the CPU cost of work that does not allocate? (a diagnostic)
    python3 tests/gpu/diag_launch.py [--rounds 3]
Each round starts one process per configuration, alternated, pinned to the same CPUs: native;
native with 1.25 TiB of address space reserved through cuMemAddressReserve (what tessera
reserves by default); tessera; tessera with va_size:32G. A process times, with no allocation
in the loop, 20,000 launches of torch.add(out=) on small tensors, 5,000 of torch.addmm(out=),
and 20,000 torch.empty + del pairs; it reports us per call."""

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gpu_util import REPO, last_json, pin_children  # noqa: E402

CONFIGS = ("native", "native+reserve", "tessera", "tessera-va32g")


def timed(fn, n):
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def child(which):
    if which.startswith("tessera"):
        import tessera
        tessera.install(conf="va_size:32G" if which == "tessera-va32g" else None)
    import torch
    torch.cuda.init()
    if which == "native+reserve":
        cuda = ctypes.CDLL("libcuda.so.1")
        ptr = ctypes.c_uint64()
        for size in (1 << 40, 1 << 38):
            rc = cuda.cuMemAddressReserve(ctypes.byref(ptr), ctypes.c_size_t(size), ctypes.c_size_t(0),
                                          ctypes.c_uint64(0), ctypes.c_uint64(0))
            assert rc == 0, f"cuMemAddressReserve: {rc}"
    x = torch.ones(256, device="cuda")
    out = torch.empty_like(x)
    a, b, c = (torch.randn(64, 64, device="cuda") for _ in range(3))
    res = {}
    for _ in range(3):  # the last pass counts
        res["add_us"] = timed(lambda: torch.add(x, x, out=out), 20000)
        res["addmm_us"] = timed(lambda: torch.addmm(c, a, b, out=c), 5000)
        torch.cuda.synchronize()
        res["empty_del_us"] = timed(lambda: torch.empty(1024, device="cuda"), 20000)
        torch.cuda.synchronize()
    print(json.dumps({"config": which, **{k: round(v, 3) for k, v in res.items()}}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", default=None)
    args = p.parse_args()
    if args.child:
        return child(args.child)
    print(f"every process on CPUs {pin_children(4)}")
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "python"))
    got = {c: [] for c in CONFIGS}
    for r in range(args.rounds):
        for which in CONFIGS[r % 4:] + CONFIGS[:r % 4]:
            proc = subprocess.run([sys.executable, __file__, "--child", which], env=env,
                                  capture_output=True, text=True, timeout=200)
            out = last_json(proc.stdout)
            if out is None:
                sys.exit(f"{which} exited {proc.returncode}: {proc.stderr[-2000:]}")
            got[which].append(out)
            print(f"round {r}: {out}", flush=True)
    for which in CONFIGS:
        print(f"{which:15s} " + "  ".join(
            f"{k} {statistics.median(o[k] for o in got[which]):.2f} "
            f"({min(o[k] for o in got[which]):.2f}-{max(o[k] for o in got[which]):.2f})"
            for k in ("add_us", "addmm_us", "empty_del_us")))


if __name__ == "__main__":
    main()
