"""The allocator's CPU cost on a real allocation stream, tessera against the native allocator
(a benchmark, not a test):
    python3 tests/gpu/bench_replay.py [--trace tests/data/gpt_varlen.trace.gz] [--rounds 3]

Replays a trace (docs/trace-format.md) through torch.cuda.caching_allocator_alloc / _delete,
so that only the allocator works (no kernels). Each round starts one process per allocator
(native; tessera through the adaptor; tessera as a plain plug-in), in an order rotated by
round. A process replays the trace once to warm its cache, then --passes times more, timed,
freeing what is left live after each pass; it reports its median pass in ns per event. The
table gives each allocator's median over the rounds, its range and the ratio to native's.
Python's call overhead is in every figure alike (about 0.3-0.6 us per call)."""

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gpu_util import REPO, last_json, pin_children  # noqa: E402

ALLOCATORS = ("native", "adaptor", "plug-in")


def load(path):
    """The trace as (is_alloc, slot, size, stream) tuples; slots number the live blocks."""
    opener = gzip.open if path.endswith(".gz") else open
    events, slot_of, free_slots, n_slots = [], {}, [], 0
    with opener(path, "rt") as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            op, addr, size, stream = line.split()
            if op == "a":
                if free_slots:
                    slot = free_slots.pop()
                else:
                    slot, n_slots = n_slots, n_slots + 1
                slot_of[addr] = slot
                events.append((True, slot, int(size), int(stream)))
            elif addr in slot_of:
                slot = slot_of.pop(addr)
                free_slots.append(slot)
                events.append((False, slot, 0, int(stream)))
    return events, n_slots


def child(which, trace, passes):
    if which != "native":
        import tessera
        tessera.install(adaptor=(which == "adaptor"))
    import torch
    torch.cuda.init()
    events, n_slots = load(trace)
    n_streams = 1 + max(e[3] for e in events)
    streams = [torch.cuda.current_stream()] + [torch.cuda.Stream() for _ in range(n_streams - 1)]
    raw = [s.cuda_stream for s in streams]
    alloc, delete = torch.cuda.caching_allocator_alloc, torch.cuda.caching_allocator_delete
    ptrs = [0] * n_slots

    def replay():
        for is_alloc, slot, size, stream in events:
            if is_alloc:
                ptrs[slot] = alloc(size, 0, raw[stream])
            else:
                delete(ptrs[slot])
                ptrs[slot] = 0
        for slot, p in enumerate(ptrs):
            if p:
                delete(p)
                ptrs[slot] = 0

    replay()  # warm: the cache fills
    torch.cuda.synchronize()
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        replay()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    print(json.dumps({"allocator": which, "events": len(events),
                      "ns_per_event": [round(t / len(events) * 1e9, 1) for t in times]}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trace", default=os.path.join(REPO, "tests", "data", "gpt_varlen.trace.gz"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--child", default=None)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.trace, args.passes)
    print(f"every process on CPUs {pin_children(4)}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        x for x in (os.path.join(REPO, "python"), os.environ.get("PYTHONPATH")) if x))
    got = {a: [] for a in ALLOCATORS}
    for r in range(args.rounds):
        for which in ALLOCATORS[r % 3:] + ALLOCATORS[:r % 3]:
            proc = subprocess.run([sys.executable, __file__, "--trace", args.trace, "--passes",
                                   str(args.passes), "--child", which], env=env, capture_output=True,
                                  text=True, timeout=300)
            out = last_json(proc.stdout)
            if proc.returncode != 0 or out is None:
                sys.stderr.write(proc.stdout + proc.stderr)
                sys.exit(f"{which} exited {proc.returncode}")
            got[which].append(statistics.median(out["ns_per_event"]))
            print(f"round {r} {which}: {out['ns_per_event']} ns/event", flush=True)
    nat = statistics.median(got["native"])
    print(f"{'allocator':10s} {'ns/event':>9s} {'range':>15s} {'vs native':>9s}  ({args.rounds} rounds, "
          f"median of {args.passes} warm passes each; {os.path.basename(args.trace)})")
    for which in ALLOCATORS:
        v = got[which]
        print(f"{which:10s} {statistics.median(v):9.1f} {min(v):7.1f}-{max(v):<7.1f} "
              f"{statistics.median(v) / nat:8.3f}x")


if __name__ == "__main__":
    main()
