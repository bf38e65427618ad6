"""Record an allocation trace from a real PyTorch run with the NATIVE allocator (a tool, not a test).

    python3 tests/gpu/record_trace.py WORKLOAD OUT.trace.gz [--seed N] [--scale X] [--no-replay]

WORKLOAD is one of:
  mixed           tensors of log-uniform sizes 512 B .. 256 MiB with random lifetimes, live set
                  bounded (8 GiB): ~20k events, a few seconds
  multistream     a producer stream and a consumer stream with record_stream, plus the default
                  stream reading results: ~10k events, a few seconds
  infer_varbatch  inference (torch.no_grad, bf16) of a 6-layer GPT-2 built from GPT2Config (no
                  download), batch 1-32 and sequence length 16-1024 drawn at random, 30 steps

The run is recorded with torch.cuda.memory._record_memory_history (no stack traces, so it
costs little) and converted from torch.cuda.memory._snapshot()["device_traces"][device] to
the trace format of docs/trace-format.md, gzip'd:
  a ADDR SIZE STREAM   an allocation
  f ADDR SIZE STREAM   its free
- A free is PyTorch's "free_completed" (when the block really returns to the pool, after the
  streams of record_stream are done with it; its address can be reused only then); a trace
  without any "free_completed" uses "free_requested". One kind only, so no double frees.
- SIZE is the block size: PyTorch records the requested size, rounded here as the native
  allocator rounds it (at least 512, a multiple of 512); a free carries its alloc's size.
- STREAM: 0 is the default stream, other streams are numbered 1, 2, ... as they appear.
- A free whose alloc was not recorded is dropped (there are none unless the ring of
  --max-entries events overflowed); blocks still live at the end stay unfreed.
Prints a one-line summary; then, if target/release/tessera-replay exists, replays the file with
--frontier and prints its JSON line. Each workload takes well under 60 s on an H100.
"""

import argparse
import collections
import gzip
import json
import math
import os
import random
import subprocess
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def log_uniform(rng, lo, hi):
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


# ----- workloads (each takes torch, a random.Random, a scale; returns a short description) -----

def wl_mixed(torch, rng, scale):
    """~10k allocations (20k events) of log-uniform sizes, lifetimes log-uniform 1..3000 allocations,
    the live set kept under 8 GiB by freeing random live tensors."""
    n_allocs = max(1, round(10_000 * scale))
    bound = 8 * GiB
    live = []  # [expires_at, nbytes, tensor]
    total = 0
    for i in range(n_allocs):
        total -= sum(item[1] for item in live if item[0] <= i)  # expired ones go
        live = [item for item in live if item[0] > i]
        size = log_uniform(rng, 512, 256 * MiB)
        while live and total + size > bound:
            total -= live.pop(rng.randrange(len(live)))[1]
        t = torch.empty(size, dtype=torch.uint8, device="cuda")
        if i % 16 == 0:
            t[:1].fill_(1)  # a kernel now and then, as in a real job
        live.append([i + log_uniform(rng, 1, 3000), size, t])
        total += size
        del t
    torch.cuda.synchronize()
    return f"{n_allocs} allocations, live bound {bound / GiB:.0f} GiB"


def wl_multistream(torch, rng, scale, widen_pending=True, size_scale=1):
    """Producer stream P allocates and fills a buffer; consumer stream C waits for P, computes a
    result from it (allocated on C), the buffer gets record_stream(C) and is dropped at once (its
    free completes only once C is done). Results are held a random while; some are reduced on the
    default stream (record_stream on it) before they go. ~2 allocations and 2 frees an iteration.
    widen_pending: one consumer step in ten first sleeps on the GPU (bench_frontier.py runs it
    without, so that no random number is drawn for it). size_scale multiplies every buffer's size."""
    iters = max(1, round(2_500 * scale))
    P, C = torch.cuda.Stream(), torch.cuda.Stream()
    default = torch.cuda.current_stream()
    held = collections.deque()
    sums = []
    for i in range(iters):
        n = log_uniform(rng, 1 * KiB, 16 * MiB) // 4 * size_scale
        with torch.cuda.stream(P):
            buf = torch.empty(n, dtype=torch.float32, device="cuda")
            buf.fill_(float(i % 7))
        C.wait_stream(P)
        with torch.cuda.stream(C):
            if widen_pending and rng.random() < 0.1:
                torch.cuda._sleep(20_000)  # widen the window in which the free is pending
            out = buf * 2.0
        buf.record_stream(C)
        del buf
        held.append(out)
        limit = rng.randint(4, 64)
        while len(held) > limit:
            old = held.popleft()
            if rng.random() < 0.25:
                default.wait_stream(C)
                sums.append(old.sum())  # a small allocation on the default stream
                old.record_stream(default)
            del old
        if len(sums) > 32:
            sums.clear()
        if i % 200 == 199:
            torch.cuda.synchronize()
    held.clear()
    sums.clear()
    torch.cuda.synchronize()
    return f"{iters} producer/consumer iterations on 2 side streams and the default stream"


def wl_infer_varbatch(torch, rng, scale):
    """GPT-2 (6 layers, 768 wide) in bf16 under no_grad; random batch and sequence length."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(rng.randrange(1 << 30))
    cfg = GPT2Config(n_layer=6, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257, use_cache=False)
    model = GPT2LMHeadModel(cfg).eval().to(dtype=torch.bfloat16)
    model = model.to("cuda")  # the weights' allocations are in the trace
    steps = max(1, round(30 * scale))
    tokens = 0
    with torch.no_grad():
        for _ in range(steps):
            b, t = rng.randint(1, 32), rng.randint(16, 1024)
            x = torch.randint(0, cfg.vocab_size, (b, t), device="cuda")
            logits = model(input_ids=x).logits
            nxt = logits[:, -1, :].argmax(dim=-1)
            nxt.cpu()  # the step ends as a server's would: the next tokens go back to the host
            tokens += b * t
            del x, logits, nxt
    del model
    torch.cuda.synchronize()
    return f"{steps} inference steps, {tokens} tokens"


WORKLOADS = {"mixed": wl_mixed, "multistream": wl_multistream, "infer_varbatch": wl_infer_varbatch}


# ----- conversion -----------------------------------------------------------------------------

def block_size(requested):
    """The native allocator's rounding of a request (round_size): at least 512, a multiple of 512."""
    return max(512, (requested + 511) // 512 * 512)


def convert(trace):
    """PyTorch trace entries (dicts with action, addr, size, stream) -> (events, info).
    events: [(kind 'a'|'f', addr, size, stream)]. See the module doc for the rules."""
    actions = collections.Counter(e.get("action") for e in trace)
    free_action = "free_completed" if actions.get("free_completed") else "free_requested"
    streams = {0: 0}
    live = {}  # addr -> (size, stream)
    events = []
    dropped = closed = zero = 0
    for e in trace:
        act = e.get("action")
        if act == "alloc":
            requested = int(e.get("size", 0))
            if requested <= 0:
                zero += 1
                continue
            addr = int(e["addr"])
            raw_stream = int(e.get("stream", 0) or 0)
            if raw_stream not in streams:
                streams[raw_stream] = len(streams)
            if addr in live:  # its free was never recorded: close it, so the trace stays consistent
                size, stream = live.pop(addr)
                events.append(("f", addr, size, stream))
                closed += 1
            size, stream = block_size(requested), streams[raw_stream]
            live[addr] = (size, stream)
            events.append(("a", addr, size, stream))
        elif act == free_action:
            addr = int(e["addr"])
            if addr not in live:
                dropped += 1
                continue
            size, stream = live.pop(addr)
            events.append(("f", addr, size, stream))
    info = {"raw_entries": len(trace), "actions": dict(actions), "free_action": free_action,
            "dropped_frees": dropped, "closed_reallocs": closed, "zero_size_allocs": zero,
            "live_at_end": len(live), "streams": len(streams)}
    return events, info


def peak_live(events):
    live = peak = 0
    for kind, _, size, _ in events:
        live += size if kind == "a" else -size
        peak = max(peak, live)
    return peak


def write_trace(path, events, header):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with gzip.open(path, "wt") as f:
        for line in header:
            f.write(f"# {line}\n")
        f.writelines(f"{k} {a} {s} {st}\n" for k, a, s, st in events)


# ----- main ---------------------------------------------------------------------------------

def record(torch, workload, rng, scale, max_entries, context=None):
    """Run the workload with the history on; return (its description, the device's trace entries).
    context=None records no stack traces: recording costs little and the snapshot stays small."""
    mem = torch.cuda.memory
    try:
        mem._record_memory_history(enabled="all", context=context, stacks="python", max_entries=max_entries)
    except TypeError:  # an older signature
        mem._record_memory_history(max_entries=max_entries)
    what = WORKLOADS[workload](torch, rng, scale)
    torch.cuda.synchronize()
    device = torch.cuda.current_device()
    snap = mem._snapshot()
    mem._record_memory_history(enabled=None)
    traces = snap.get("device_traces") or []
    trace = traces[device] if device < len(traces) else []
    return what, trace


def replay(path, timeout):
    exe = os.path.join(REPO, "target", "release", "tessera-replay")
    if not os.path.isfile(exe):
        print(f"(no {exe}: skipping the replay check; cargo build --release builds it)")
        return None
    t0 = time.time()
    try:
        proc = subprocess.run([exe, path, "--frontier"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"tessera-replay --frontier: timed out after {timeout} s")
        return False
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"tessera-replay exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        return False
    print(f"tessera-replay {os.path.basename(path)} --frontier ({time.time() - t0:.1f} s):")
    print(lines[-1])
    return json.loads(lines[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workload", choices=sorted(WORKLOADS))
    p.add_argument("out", help="output path (gzip; .trace.gz by convention)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the workload's length")
    p.add_argument("--max-entries", type=int, default=2_000_000, help="history ring size")
    p.add_argument("--no-replay", action="store_true", help="skip the tessera-replay check")
    p.add_argument("--replay-timeout", type=int, default=600)
    args = p.parse_args()
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ:
        print(f"note: PYTORCH_CUDA_ALLOC_CONF={os.environ['PYTORCH_CUDA_ALLOC_CONF']} applies to this recording")

    import torch
    torch.cuda.init()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()
    what, trace = record(torch, args.workload, rng, args.scale, args.max_entries)
    if not any(e.get("action") == "alloc" for e in trace):
        # Should not happen; if this PyTorch keeps no trace without stack context, record with it.
        print("no alloc entries recorded with context=None: recording again with context='all'")
        rng = random.Random(args.seed)
        torch.manual_seed(args.seed)
        t0 = time.time()
        what, trace = record(torch, args.workload, rng, args.scale, args.max_entries, context="all")
    secs = time.time() - t0
    if len(trace) >= args.max_entries:
        print(f"WARNING: the history ring is full ({len(trace)} entries): the earliest events were lost; "
              "raise --max-entries")
    events, info = convert(trace)
    if not events:
        sys.exit(f"no events recorded ({info})")
    peak = peak_live(events)
    n_alloc = sum(1 for e in events if e[0] == "a")
    header = [f"action addr size stream (PyTorch native allocator trace, {args.workload})",
              f"{what}; seed {args.seed}, scale {args.scale}; torch {torch.__version__}, "
              f"{torch.cuda.get_device_name()}",
              f"{len(events)} events, peak live {peak} bytes ({peak / GiB:.3f} GiB), "
              f"free = {info['free_action']}, sizes rounded to 512"]
    write_trace(args.out, events, header)
    print(f"record_trace: {args.workload}: {len(events)} events ({n_alloc} allocs, "
          f"{len(events) - n_alloc} frees, {info['live_at_end']} live at end), peak live {peak} bytes "
          f"({peak / GiB:.3f} GiB), {info['streams']} streams, {info['dropped_frees']} dropped frees, "
          f"{info['closed_reallocs']} closed reallocs, run {secs:.1f} s, {info['raw_entries']} raw entries "
          f"(free = {info['free_action']}) -> {args.out}")
    if not args.no_replay:
        if replay(args.out, args.replay_timeout) is False:
            sys.exit(1)


if __name__ == "__main__":
    main()
