"""Pause and resume time per GiB, tessera against torch_memory_saver, side by side (a
benchmark, not a test):
    python3 tests/gpu/bench_sleep.py [--rounds 3] [--cycles 5] [--allocators tessera,tessera_keep,torch_memory_saver]
tessera_keep is tessera with keep_backups:true (a resume keeps its page-locked copies for the
next pause). torch_memory_saver (PyPI torch-memory-saver) must be importable (its wheel, or its source built
with `TMS_CUDA_MAJOR=13 python3 setup.py build_ext --inplace` on PYTHONPATH); it runs in its
"torch" hook mode (a CUDAPluggableAllocator inside a MemPool per tag, the native allocator
outside). Each round starts one process per allocator, alternated. A process allocates 6 GiB of
weights (24 tensors) under tag "weights" with a CPU backup and a 24 GiB KV cache under tag "kv"
without, then runs one warm cycle and --cycles timed ones: pause weights, pause kv, resume kv,
resume weights, each timed alone (the GPU idle, memory free), the weights checked bit for bit
after every resume. It reports the median per operation in seconds per GiB; the table gives each
allocator's median over the rounds and the range. A process that crashes after printing its
result (torch_memory_saver built from source has segfaulted at exit) still counts, and the
crashes are listed under the table."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gpu_util import REPO, last_json, pin_children  # noqa: E402

GiB = 1 << 30
OPS = ("pause_backup", "pause", "resume", "resume_restore")


def child(which, cycles):
    if which == "tessera_keep":
        os.environ["TESSERA_CONF"] = ",".join(x for x in (os.environ.get("TESSERA_CONF"), "keep_backups:true") if x)
    if which.startswith("tessera"):
        import tessera
        tessera.install()
        import torch

        def region(tag, backup):
            return tessera.region(tag)
        pause = {"weights": lambda: tessera.pause("weights", backup="cpu"), "kv": lambda: tessera.pause("kv")}
        resume = tessera.resume
    else:
        import torch
        from torch_memory_saver import torch_memory_saver as tms
        tms.hook_mode = "torch"

        def region(tag, backup):
            return tms.region(tag=tag, enable_cpu_backup=backup)
        pause = {"weights": lambda: tms.pause("weights"), "kv": lambda: tms.pause("kv")}
        resume = tms.resume
    dev = torch.device("cuda")
    torch.manual_seed(0)
    with region("weights", True):
        weights = [torch.randn(8192, 8192, device=dev) for _ in range(24)]
    with region("kv", False):
        kv = torch.empty(24 * GiB // 4, device=dev)
    kv.zero_()
    sums = [w.double().sum().item() for w in weights]
    sizes = {"weights": 24 * 8192 * 8192 * 4 / GiB, "kv": 24.0}
    got = {op: [] for op in OPS}

    def timed(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    for cycle in range(cycles + 1):
        t = {"pause_backup": timed(pause["weights"]) / sizes["weights"], "pause": timed(pause["kv"]) / sizes["kv"]}
        t["resume"] = timed(lambda: resume("kv")) / sizes["kv"]
        t["resume_restore"] = timed(lambda: resume("weights")) / sizes["weights"]
        ok = all(w.double().sum().item() == s for w, s in zip(weights, sums))
        if not ok:
            sys.exit(f"{which}: the weights changed across pause and resume (cycle {cycle})")
        kv.fill_(1.0)
        if cycle > 0:
            for op in OPS:
                got[op].append(t[op])
    print(json.dumps({"allocator": which, **{op: statistics.median(v) for op, v in got.items()}}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cycles", type=int, default=5)
    p.add_argument("--child", default=None)
    p.add_argument("--allocators", default="tessera,tessera_keep,torch_memory_saver")
    args = p.parse_args()
    if args.child:
        return child(args.child, args.cycles)
    print(f"every process on CPUs {pin_children(4)}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (os.path.join(REPO, "python"), env.get("PYTHONPATH")) if x)
    names = tuple(args.allocators.split(","))
    got = {n: [] for n in names}
    crashed = {n: [] for n in names}
    for r in range(args.rounds):
        for which in (names if r % 2 == 0 else names[::-1]):
            proc = subprocess.run([sys.executable, __file__, "--cycles", str(args.cycles), "--child", which],
                                  env=env, capture_output=True, text=True, timeout=240)
            out = last_json(proc.stdout)
            if out is None:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                sys.exit(f"{which} exited {proc.returncode} without its result")
            if proc.returncode != 0:
                # Its result is in (every cycle checked its contents); the crash came after.
                crashed[which].append(proc.returncode)
            got[which].append(out)
            print(f"round {r}: {out}{f' (then exited {proc.returncode})' if proc.returncode else ''}", flush=True)
    print(f"seconds per GiB, median of {args.rounds} processes (range), each the median of {args.cycles} cycles")
    print(f"{'allocator':20s} " + " ".join(f"{op:>22s}" for op in OPS))
    for which in names:
        cells = []
        for op in OPS:
            v = [o[op] for o in got[which]]
            cells.append(f"{statistics.median(v):.4f} ({min(v):.4f}-{max(v):.4f})")
        print(f"{which:20s} " + " ".join(f"{c:>22s}" for c in cells))
    for which, codes in crashed.items():
        if codes:
            print(f"{which} exited {codes} after reporting in {len(codes)} of {args.rounds} processes")


if __name__ == "__main__":
    main()
