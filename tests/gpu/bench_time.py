"""Warm wall time of the workloads, tessera against PyTorch's allocators, side by side (a
benchmark, not a test): where memory is plentiful, does tessera's growth and recycling cost time?

    python3 tests/gpu/bench_time.py [--workloads gpt2,kvcache,...] [--rounds 3] [--runs 3]
        [--allocators native,expandable,async,tessera,tessera_thread] [--lib NAME=PATH ...]

Workloads: bench_frontier.py's seven (gpt2, resnet, kvcache, churn, multistream, multistream4,
infer), `rebuild` (a GPT-2 training run that builds its model and optimizer anew every run) and
`manystream` (64 streams taking turns: each allocates, computes and frees on its own stream).
Allocators: native, expandable (expandable_segments:True), async (cudaMallocAsync), tessera
(through the torch adaptor, default configuration), tessera_thread (driver_thread:true);
--lib NAME=PATH adds another tessera build.

Each round starts one process per allocator, in an order rotated by round (alternated). A process
runs every workload in turn: the cache emptied and the peaks reset, one warm-up run (kernels
load, the cache fills), then --runs timed runs with the cache kept between them, as a serving or
training process keeps it. A process reports per workload its median run; the table gives, per
workload and allocator, the median over the rounds and its range, the ratio to native's median,
peak reserved over peak allocated (of the timed runs), and, for tessera, the driver time per run
on the allocating threads and on the driver thread.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gpu_util import REPO, last_json  # noqa: E402

PEERS = {"native": None, "expandable": "expandable_segments:True", "async": "backend:cudaMallocAsync"}
TESSERA_CONF = {"tessera": None, "tessera_thread": "driver_thread:true"}
WORKLOADS = ["gpt2", "resnet", "kvcache", "churn", "multistream", "multistream4", "infer", "rebuild", "manystream"]


def wl_rebuild(torch, seed, scale):
    """GPT-2 124M built with its AdamW anew each run, 6 steps of random batch and length."""
    import bench_frontier
    rng = random.Random(seed)
    model, cfg = bench_frontier.build_gpt2(torch, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(6):
        b, t = rng.randint(2, 8), rng.randint(64, 512)
        x = torch.randint(0, cfg.vocab_size, (b, t), device="cuda")
        bench_frontier.gpt2_step(torch, model, opt, x)
        del x
    del model, opt


_STREAMS = []


def wl_manystream(torch, seed, scale):
    """64 side streams in turn, 1,500 iterations: a 1-16 MiB buffer allocated on one stream, a
    kernel there, the buffer freed; every 64 iterations the default stream waits for them all."""
    rng = random.Random(seed)
    if not _STREAMS:
        _STREAMS.extend(torch.cuda.Stream() for _ in range(64))
    for i in range(1500):
        s = _STREAMS[i % 64]
        with torch.cuda.stream(s):
            t = torch.empty(rng.randint(1, 16) << 20, dtype=torch.uint8, device="cuda")
            t[:4096].fill_(1)
            del t
        if i % 64 == 63:
            for s in _STREAMS:
                torch.cuda.current_stream().wait_stream(s)


def child(which, workloads, runs, lib, conf):
    tt = None
    if lib:
        import tessera
        tessera.install(lib_path=lib, conf=conf)
        tt = tessera
    import torch
    import bench_frontier
    table = dict(bench_frontier.WORKLOADS, rebuild=wl_rebuild, manystream=wl_manystream)
    out = {}
    for name in workloads:
        wl = table[name]
        torch.cuda.empty_cache()
        wl(torch, 0, 1.0)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times, caller, background = [], [], []
        for _ in range(runs):
            before = tt.stats() if tt else None
            t0 = time.perf_counter()
            wl(torch, 0, 1.0)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            if tt:
                after = tt.stats()
                caller.append((after["driver_ns"] - before["driver_ns"]) / 1e6)
                background.append((after.get("background_driver_ns", 0) - before.get("background_driver_ns", 0)) / 1e6)
        out[name] = {"time": statistics.median(times), "times": times,
                     "reserved": torch.cuda.max_memory_reserved(), "allocated": torch.cuda.max_memory_allocated(),
                     "caller_ms": statistics.median(caller) if caller else None,
                     "background_ms": statistics.median(background) if background else None}
    print(json.dumps({"allocator": which, "workloads": out}), flush=True)


def spread(xs):
    return f"{min(xs):.3f}-{max(xs):.3f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--allocators", default="native,expandable,async,tessera,tessera_thread")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--lib", action="append", default=[], help="NAME=PATH: another tessera build")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        which, workloads, lib, conf = a.child
        return child(which, workloads.split(","), a.runs, lib if lib != "-" else None, conf if conf != "-" else None)
    default_lib = os.environ.get("TESSERA_LIB") or os.path.join(REPO, "target", "release", "libtessera.so")
    libs = {name: default_lib for name in TESSERA_CONF}
    for spec in a.lib:
        name, _, path = spec.partition("=")
        libs[name] = os.path.abspath(path)
    names = [x for x in a.allocators.split(",") if x] + [n for n in libs if n not in TESSERA_CONF]
    workloads = [w for w in a.workloads.split(",") if w]
    results = {}  # (workload, allocator) -> list of per-round dicts
    for rnd in range(a.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for which in order:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "python"), HERE]))
            env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
            env.pop("TESSERA_CONF", None)
            if PEERS.get(which):
                env["PYTORCH_CUDA_ALLOC_CONF"] = PEERS[which]
            lib = libs.get(which, "-") if which not in PEERS else "-"
            conf = TESSERA_CONF.get(which) or "-"
            t0 = time.time()
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--runs", str(a.runs), "--child",
                                   which, ",".join(workloads), lib, conf], env=env, capture_output=True, text=True,
                                  timeout=900)
            r = last_json(proc.stdout)
            if r is None:
                print(f"round {rnd} {which}: failed: {proc.stderr.strip()[-800:]}", flush=True)
                continue
            for w, v in r["workloads"].items():
                results.setdefault((w, which), []).append(v)
            print(f"round {rnd} {which}: {time.time() - t0:.0f} s: " + ", ".join(
                f"{w} {v['time']:.3f} s" + (f" (driver {v['caller_ms']:.1f} + {v['background_ms']:.1f} ms)"
                                            if v["caller_ms"] is not None else "")
                for w, v in r["workloads"].items()), flush=True)
    print(f"\n{a.rounds} rounds (one process per allocator each, order rotated), {a.runs} timed runs per process;"
          " time: median over rounds of each process's median run [range over rounds]")
    print("\n| workload | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for w in workloads:
        base = results.get((w, "native"))
        base_t = statistics.median(x["time"] for x in base) if base else None
        cells = []
        for which in names:
            rs = results.get((w, which))
            if not rs:
                cells.append("-")
                continue
            t = statistics.median(x["time"] for x in rs)
            ratio = f" **{t / base_t:.2f}x**" if base_t and which != "native" else ""
            res = statistics.median(x["reserved"] / max(x["allocated"], 1) for x in rs)
            cell = f"{t:.3f} s{ratio} [{spread([x['time'] for x in rs])}], res/live {res:.2f}"
            if rs[0]["caller_ms"] is not None:
                cell += f", driver {statistics.median(x['caller_ms'] for x in rs):.1f} ms"
                bg = statistics.median(x["background_ms"] for x in rs)
                if bg:
                    cell += f" + {bg:.1f} ms off-thread"
            cells.append(cell)
        print(f"| {w} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
