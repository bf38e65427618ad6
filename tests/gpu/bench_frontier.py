"""OOM-frontier benchmark: tessera vs PyTorch's allocators, side by side (a benchmark, not a test).

    python3 tests/gpu/bench_frontier.py [--workloads gpt2,resnet,kvcache,churn,multistream]
        [--allocators tessera,native,expandable,async] [--steps 1.0] [--max-steps-bisect 5]
        [--budget-min 8] [--child-timeout 60] [--out FILE]

Allocators (each (allocator, workload) run is its own process: the swap is one-way and
PYTORCH_CUDA_ALLOC_CONF is read at CUDA init):
  tessera     tessera_torch.install() (TESSERA_CONF, if set, applies)
  native      PyTorch's default caching allocator
  expandable  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  async       PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
Workloads (deterministic given --seed: the same tensor sizes in every run, whatever the allocator):
  gpt2     GPT-2 124M (transformers GPT2Config, no download) training, AdamW, bf16 autocast,
           batch 2-8 x sequence 64-512 drawn per step, 12 steps
  resnet   torchvision resnet50(weights=None) training, SGD, bf16 autocast, batch 8-32 and
           resolution 128-256 (multiples of 16) drawn per step, 12 steps
  kvcache  KV caches grown by torch.cat: sequences arrive at random, every step appends one
           token row (128 KiB) to each live sequence's cache, sequences end at random, 300 steps
  churn    torch.empty of log-uniform sizes 512 B - 256 MiB, random lifetimes, live set kept
           under 3 GiB, 3000 allocations
  multistream  producer and consumer streams with record_stream (record_trace.py's multistream),
           about 100 MiB live
  multistream4  the same with every buffer 4x larger, about 0.35 GiB live
  infer    GPT-2 (6 layers) inference in bf16, batch 1-32 x sequence 16-1024 drawn per step, 30 steps
           (record_trace.py's infer_varbatch)

Method. One process per (allocator, workload) pair, warm after its first run:
1. an uncapped run: peak allocated bytes ("peak live": max_memory_allocated, tessera's
   allocated_bytes peak) and peak reserved bytes. It also loads every kernel module and library
   handle the workload needs, so later runs measure the allocator alone.
2. the OOM frontier, the least memory the allocator may take with which the workload completes:
   between runs everything is freed and the cache emptied; a BALLAST taken with the CUDA driver
   (cuMemAlloc on the primary context) then leaves exactly B - R0 bytes free (to 2 MiB), where R0
   is what the allocator still holds (tensors that live across runs: cuBLAS workspaces), and the
   workload runs again: completed, out of memory, or an error (which ends the pair's bisection).
   Bisection on B between peak allocated (assumed to fail) and 2 x peak + 1 GiB, to max(1% of
   peak, 2 MiB), at most --max-steps-bisect runs; the first probe is the uncapped run's peak
   reserved plus a step S = max(resolution, 2% of peak) (usually a pass, which narrows the range
   at once); while probes fail, the next ones are peak reserved + 4 S, 1.25 x peak reserved + S,
   1.6 x and 2.2 x peak reserved, before the middle of what is left.
Ratios are over the allocator's own peak allocated. Memory the process takes outside the allocator
(kernel modules, library handles) is left out of the frontier; its size is shown as "non-alloc MiB"
(device memory used after the uncapped run minus the allocator's reserved bytes).

Prints progress lines and a markdown table last:
workload | allocator | peak live GiB | reserved ratio | frontier ratio | frontier GiB | non-alloc MiB | runs
Writes JSON to --out (default $OUT/bench_frontier.json, else /tmp/bench_frontier.json) and every
child's output tail to the .log beside it. Default run: 28 pairs, 28 processes of 1 + up to 6 runs;
about 7-8 minutes on an H100 (more than one device call allows: split it with --workloads).
"""

import argparse
import ctypes
import gc
import json
import math
import os
import random
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gpu_util import REPO, last_json, note  # noqa: E402  (gpu_util also puts python/ and examples/ on sys.path)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
GRAIN = 2 * MiB

ALLOCATORS = {  # name -> PYTORCH_CUDA_ALLOC_CONF (None: unset)
    "tessera": None,
    "native": None,
    "expandable": "expandable_segments:True",
    "async": "backend:cudaMallocAsync",
}


# ----- the CUDA driver, for the ballast ------------------------------------------------------------

class Driver:
    """The CUDA driver API through ctypes, on the device's primary context: the context the CUDA
    runtime (so PyTorch) and tessera use. Retaining it creates it, so the context's own memory
    is gone before anything is measured."""

    def __init__(self, ordinal=0):
        c = ctypes
        lib = c.CDLL("libcuda.so.1")
        sigs = {
            "cuInit": [c.c_uint],
            "cuDeviceGet": [c.POINTER(c.c_int), c.c_int],
            "cuDevicePrimaryCtxRetain": [c.POINTER(c.c_void_p), c.c_int],
            "cuCtxPushCurrent_v2": [c.c_void_p],
            "cuCtxPopCurrent_v2": [c.POINTER(c.c_void_p)],
            "cuMemGetInfo_v2": [c.POINTER(c.c_size_t), c.POINTER(c.c_size_t)],
            "cuMemAlloc_v2": [c.POINTER(c.c_uint64), c.c_size_t],
            "cuMemFree_v2": [c.c_uint64],
            "cuGetErrorName": [c.c_int, c.POINTER(c.c_char_p)],
        }
        for name, argtypes in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, c.c_int
        self.lib = lib
        self._check(lib.cuInit(0), "cuInit")
        dev = c.c_int()
        self._check(lib.cuDeviceGet(c.byref(dev), ordinal), "cuDeviceGet")
        self.ctx = c.c_void_p()
        self._check(lib.cuDevicePrimaryCtxRetain(c.byref(self.ctx), dev), "cuDevicePrimaryCtxRetain")
        self.ballast = []  # device pointers, never freed: the process's exit returns them

    def _name(self, rc):
        s = ctypes.c_char_p()
        self.lib.cuGetErrorName(rc, ctypes.byref(s))
        return (s.value or b"?").decode()

    def _check(self, rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} failed: {self._name(rc)} ({rc})")

    def _push(self):
        self._check(self.lib.cuCtxPushCurrent_v2(self.ctx), "cuCtxPushCurrent")

    def _pop(self):
        old = ctypes.c_void_p()
        self._check(self.lib.cuCtxPopCurrent_v2(ctypes.byref(old)), "cuCtxPopCurrent")

    def mem_info(self):
        """(free, total) bytes of the device."""
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self._push()
        try:
            self._check(self.lib.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)), "cuMemGetInfo")
        finally:
            self._pop()
        return free.value, total.value

    def _alloc(self, n):
        ptr = ctypes.c_uint64()
        self._push()
        try:
            rc = self.lib.cuMemAlloc_v2(ctypes.byref(ptr), n)
        finally:
            self._pop()
        if rc == 0:
            self.ballast.append(ptr.value)
        return rc == 0

    def drop_ballast(self):
        self._push()
        try:
            for ptr in self.ballast:
                self._check(self.lib.cuMemFree_v2(ptr), "cuMemFree")
        finally:
            self._pop()
        self.ballast = []

    def floor(self):
        """The free bytes the driver reports when it hands out nothing more, to 64 KiB: memory that
        no allocator gets (2.19 MiB on an H100, 3.125 MiB on an H200, driver 580: tests/gpu/vmm_headroom.py)."""
        self.take_ballast(0)
        piece = GRAIN
        while piece >= 64 * KiB:
            if not self._alloc(piece):
                piece //= 2
        free = self.mem_info()[0]
        self.drop_ballast()
        return free

    def take_ballast(self, target_free):
        """Allocate until free memory is target_free (to GRAIN above it). Returns bytes taken."""
        taken = 0
        for _ in range(64):
            free, _ = self.mem_info()
            excess = (free - target_free) // GRAIN * GRAIN
            if excess < GRAIN:
                break
            n = excess
            while n >= GRAIN and not self._alloc(n):  # one piece, else halves
                n = n // 2 // GRAIN * GRAIN
            if n < GRAIN:
                break
            taken += n
        return taken


# ----- workloads ------------------------------------------------------------------------------

def steps_of(base, scale):
    return max(1, round(base * scale))


def build_gpt2(torch, seed, n_layer=12):
    """GPT-2 124M (n_layer 12, 768 wide, 12 heads, 1024 positions, vocab 50257) on the GPU, for
    training. Built from a config: nothing is downloaded."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257,
                     use_cache=False)
    model = GPT2LMHeadModel(cfg).to("cuda").train()
    return model, cfg


def gpt2_step(torch, model, opt, x):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)  # a sync per step, as a training loop that logs its loss


def wl_gpt2(torch, seed, scale):
    rng = random.Random(seed)
    model, cfg = build_gpt2(torch, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    steps = steps_of(12, scale)
    for _ in range(steps):
        b, t = rng.randint(2, 8), rng.randint(64, 512)
        x = torch.randint(0, cfg.vocab_size, (b, t), device="cuda")
        gpt2_step(torch, model, opt, x)
        del x
    return steps


def wl_resnet(torch, seed, scale):
    import torchvision
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None).to("cuda").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    steps = steps_of(12, scale)
    for _ in range(steps):
        b, r = rng.randint(8, 32), 16 * rng.randint(8, 16)
        x = torch.randn(b, 3, r, r, device="cuda")
        y = torch.randint(0, 1000, (b,), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        del x, y, loss
    return steps


def wl_kvcache(torch, seed, scale):
    """Each sequence's cache is one (2, layers 8, heads 32, T, 128) bf16 tensor: 128 KiB per token.
    A new sequence brings a prefill of 16-512 tokens and will decode 16-400 more; every step, one
    arrival with probability 0.3 (at most 40 live) and each live sequence grows by one token row
    (torch.cat: a new tensor, the old one freed); a sequence also ends early with probability 1/200."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    L, H, D, max_live = 8, 32, 128, 40
    steps = steps_of(300, scale)
    live = []  # [cache, tokens still to decode]

    def arrive():
        prefill = rng.randint(16, 512)
        live.append([torch.randn(2, L, H, prefill, D, dtype=torch.bfloat16, device="cuda"),
                     rng.randint(16, 400)])

    for _ in range(16):  # a server already busy
        arrive()
    for _ in range(steps):
        if len(live) < max_live and rng.random() < 0.3:
            arrive()
        survivors = []
        for seq in live:
            row = torch.randn(2, L, H, 1, D, dtype=torch.bfloat16, device="cuda")
            seq[0] = torch.cat([seq[0], row], dim=3)
            del row
            seq[1] -= 1
            if seq[1] > 0 and rng.random() >= 1 / 200:
                survivors.append(seq)
        live = survivors
    torch.cuda.synchronize()
    return steps


def wl_churn(torch, seed, scale):
    """torch.empty of log-uniform sizes 512 B .. 256 MiB, each with a lifetime log-uniform in
    1 .. 1000 allocations; while the live set would pass 3 GiB, random live tensors go first."""
    rng = random.Random(seed)
    ops = steps_of(3000, scale)
    bound = 3 * GiB
    live = []  # [expires_at, nbytes, tensor]
    total = 0
    lo, hi = math.log(512), math.log(256 * MiB)
    for i in range(ops):
        total -= sum(item[1] for item in live if item[0] <= i)  # expired ones go
        live = [item for item in live if item[0] > i]
        size = int(math.exp(rng.uniform(lo, hi)))
        while live and total + size > bound:
            total -= live.pop(rng.randrange(len(live)))[1]
        t = torch.empty(size, dtype=torch.uint8, device="cuda")
        if i % 8 == 0:
            t[:1].fill_(1)  # a kernel now and then
        live.append([i + int(math.exp(rng.uniform(0, math.log(1000)))), size, t])
        total += size
        del t
    torch.cuda.synchronize()
    return ops


def wl_multistream(torch, seed, scale):
    """record_trace.py's multistream (without its sleeping consumer steps): a producer stream fills
    a buffer of log-uniform size 1 KiB - 16 MiB, a consumer stream computes a result from it
    (record_stream, the buffer dropped at once); results are held 4-64 iterations, a quarter of them
    reduced on the default stream first. 2500 iterations, about 100 MiB live at the peak."""
    import record_trace
    return record_trace.wl_multistream(torch, random.Random(seed), scale, widen_pending=False)


def wl_multistream4(torch, seed, scale):
    """multistream with every buffer 4x larger (4 KiB - 64 MiB): the same pattern at about
    0.35 GiB live, where one 2 MiB granule is under 1% of the peak."""
    import record_trace
    return record_trace.wl_multistream(torch, random.Random(seed), scale, widen_pending=False, size_scale=4)


def wl_infer(torch, seed, scale):
    """record_trace.py's infer_varbatch: GPT-2 (6 layers) in bf16 under no_grad, built in the run,
    30 steps of batch 1-32 x sequence 16-1024 drawn at random, the next tokens copied to the host."""
    import record_trace
    return record_trace.wl_infer_varbatch(torch, random.Random(seed), scale)


WORKLOADS = {"gpt2": wl_gpt2, "resnet": wl_resnet, "kvcache": wl_kvcache, "churn": wl_churn,
             "multistream": wl_multistream, "multistream4": wl_multistream4, "infer": wl_infer}
# Out of memory, from the allocator or from a library that met it (cuDNN's "unable to find an
# engine": every plan's workspace failed to allocate).
OOM_MARKERS = ("out of memory", "ALLOC_FAILED", "CUBLAS_STATUS_NOT_INITIALIZED", "CUDNN_STATUS_NOT_INITIALIZED",
               "unable to find an engine")


def is_oom(msg):
    return any(m.lower() in msg.lower() for m in OOM_MARKERS)


# ----- the child: one run of one workload with one allocator ---------------------------------

def allocator_stats(torch, tt):
    """(peak allocated, peak reserved, reserved now, extra counters) of the allocator in use."""
    if tt is not None:
        s = tt.stats()
        peak_alloc = tt.max_memory_allocated() if hasattr(tt, "max_memory_allocated") else s["allocated_bytes"]["peak"]
        peak_res = tt.max_memory_reserved() if hasattr(tt, "max_memory_reserved") else s["reserved_bytes"]["peak"]
        extra = {k: s[k] for k in ("alloc_retries", "ooms", "reclaimed_granules", "gap_placements",
                                   "driver_map_calls", "driver_unmap_calls") if k in s}
        return peak_alloc, peak_res, s["reserved_bytes"]["current"], extra
    extra = {}
    try:
        ms = torch.cuda.memory_stats()
        extra = {k: ms[k] for k in ("num_alloc_retries", "num_ooms") if k in ms}
    except Exception as e:  # some keys are missing with cudaMallocAsync
        extra = {"memory_stats_error": str(e)[:200]}
    return (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved(),
            torch.cuda.memory_reserved(), extra)


def run_once(torch, tt, workload, args):
    """One run of the workload from an empty cache: (status, error, seconds). Everything it
    allocated is freed and the cache emptied before it returns."""
    if tt is not None:
        tt.reset_peak_stats()
    else:
        torch.cuda.reset_peak_memory_stats()
    status, error = "error", ""
    t0 = time.time()
    try:
        WORKLOADS[workload](torch, args.seed, args.steps)
        torch.cuda.synchronize()
        status = "ok"
    except Exception as e:
        error = f"{type(e).__name__}: {e}"[:600]
        status = "oom" if is_oom(error) else "error"
        if status == "error":
            traceback.print_exc()
    secs = round(time.time() - t0, 2)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return status, error, secs


def child(args):
    """One (allocator, workload) pair: the uncapped run, then the bisection, in this process."""
    out = {"allocator": args.child[0], "workload": args.child[1], "status": "error", "error": "",
           "probes": []}
    code = 1
    try:
        which, workload = args.child
        drv = Driver()
        free0, total = drv.mem_info()
        out.update(free_at_start=free0, total=total)
        tt = None
        if which == "tessera":
            import tessera_torch as tt
            tt.install()
        import torch
        torch.cuda.init()
        out.update(torch=torch.__version__, device=torch.cuda.get_device_name(),
                   alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                   tessera_conf=os.environ.get("TESSERA_CONF") if tt else None)
        status, error, secs = run_once(torch, tt, workload, args)
        peak_alloc, peak_res, _, extra = allocator_stats(torch, tt)
        res0 = allocator_stats(torch, tt)[2]
        free1, _ = drv.mem_info()
        out["driver_floor"] = drv.floor()
        out.update(status=status, error=error, workload_s=secs, peak_allocated=peak_alloc,
                   peak_reserved=peak_res, stats=extra, reserved_between_runs=res0,
                   nonalloc=(free0 - free1) - res0)
        print(f"uncapped: {status} in {secs} s, peak allocated {peak_alloc}, reserved {peak_res}", flush=True)
        if status != "ok" or args.max_steps_bisect <= 0:
            raise SystemExit
        peak = peak_alloc
        lo, hi = align(peak), align(min(2 * peak + GiB + GRAIN - 1, free1 + res0))
        res = max(0.01 * peak, 2 * MiB)

        def probe(budget):
            drv.drop_ballast()
            r0 = allocator_stats(torch, tt)[2]
            target = budget - r0
            drv.take_ballast(target)
            free_now, _ = drv.mem_info()
            if free_now > target + 8 * MiB:
                raise RuntimeError(f"the ballast left {free_now} bytes free, wanted {target}")
            st, err, secs = run_once(torch, tt, workload, args)
            p = {"budget": budget, "reserved_before": r0, "free_before": free_now, "status": st,
                 "error": err, "workload_s": secs}
            if tt is not None:
                p["stats"] = allocator_stats(torch, tt)[3]
            out["probes"].append(p)
            print(f"probe {budget / GiB:.3f} GiB -> {st} ({secs} s) {err[:200]}", flush=True)
            if st == "error":
                raise RuntimeError(f"probe at {budget}: {err}")
            return st == "ok"

        step = max(res, 0.02 * peak)
        guesses = [peak_res + step, peak_res + 4 * step, 1.25 * peak_res + step, 1.6 * peak_res, 2.2 * peak_res]
        try:
            frontier, verified, runs = bisect(probe, lo, hi, res, args.max_steps_bisect, guesses)
        except RuntimeError as e:
            frontier, verified = None, False
            out["note"] = str(e)[:300]
        failed = [p["budget"] for p in out["probes"] if p["status"] != "ok"]
        out.update(frontier=frontier, frontier_verified=verified, bisect_lo=lo, bisect_hi=hi, resolution=int(res),
                   frontier_bracket=[max([lo] + [f for f in failed if frontier is None or f < frontier]), frontier])
        at = [p for p in out["probes"] if p["budget"] == frontier and p["status"] == "ok"]
        if at:
            out["usable_frontier"] = at[0]["free_before"] + at[0]["reserved_before"] - out["driver_floor"]
        drv.drop_ballast()
    except SystemExit:
        pass
    except Exception as e:  # setup failed
        traceback.print_exc()
        out.update(status="error", error=f"{type(e).__name__}: {e}"[:600])
    code = 0 if out["status"] == "ok" else 1
    sys.stderr.flush()
    print(json.dumps(out), flush=True)
    os._exit(code)  # no teardown: the driver frees everything at exit, fast


# ----- the parent -------------------------------------------------------------------------------

class Runner:
    """Runs children, one at a time; keeps a log of every child's output tail."""

    def __init__(self, args, log_path):
        self.args = args
        self.log = open(log_path, "w")
        self.count = 0
        self.t_start = time.time()

    def run(self, which, workload):
        a = self.args
        env = dict(os.environ)
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        if ALLOCATORS[which]:
            env["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATORS[which]
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (os.path.join(REPO, "python"), os.path.join(REPO, "examples"), HERE, env.get("PYTHONPATH")) if p)
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", which, workload,
               "--max-steps-bisect", str(a.max_steps_bisect), "--seed", str(a.seed), "--steps", str(a.steps)]
        t0 = time.time()
        timed_out = False
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=a.child_timeout)
            stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            timed_out = True
            stdout, stderr, rc = _text(e.stdout), _text(e.stderr), None
        secs = time.time() - t0
        self.count += 1
        summary = last_json(stdout)
        if summary is None:
            last = (stderr.strip().splitlines() or ["(no output)"])[-1]
            summary = {"allocator": which, "workload": workload, "probes": [],
                       "status": "timeout" if timed_out else "error",
                       "error": f"{'timed out' if timed_out else f'exit {rc}'} with no summary: {last}"[:600]}
        summary["rc"], summary["elapsed_s"] = rc, round(secs, 2)
        n = 60 if summary["status"] not in ("ok", "oom") else 8
        self.log.write(f"===== {which} {workload} -> {summary['status']} "
                       f"rc={rc} {secs:.1f}s\n--- stdout\n{_tail(stdout, n)}\n--- stderr\n{_tail(stderr, n)}\n")
        self.log.flush()
        return summary


def _tail(text, n):
    return "\n".join(text.splitlines()[-n:])


def _text(b):
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def gib(n):
    return n / GiB


def align(n):
    return int(n) // GRAIN * GRAIN


def bisect(probe, lo, hi, res, max_steps, guesses=()):
    """Least passing value in (lo, hi], to res: lo is assumed to fail, hi to pass (unverified).
    probe(x) -> True (completed), False (did not). Each probe is the next of guesses that lies
    well inside the current range (guesses outside it are skipped), else the middle. If every
    probe failed and a step is left, hi is tried. Returns (frontier or None, verified, probes run)."""
    best, runs = None, 0
    guesses = list(guesses)
    while runs < max_steps and hi - lo > res:
        mid = (lo + hi) / 2
        while guesses:
            g = guesses.pop(0)
            if lo + res / 2 < g < hi - res / 2:
                mid = g
                break
        mid = align(mid)
        if mid <= lo or mid >= hi:
            break
        runs += 1
        if probe(mid):
            hi, best = mid, mid
        else:
            lo = mid
    if best is None and runs < max_steps:
        runs += 1
        if probe(hi):
            best = hi
    if best is None:
        return None, False, runs
    return best, True, runs


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--allocators", default=",".join(ALLOCATORS))
    p.add_argument("--steps", type=float, default=1.0, help="scales every workload's steps")
    p.add_argument("--max-steps-bisect", type=int, default=6, help="bisection runs per pair (0: uncapped only)")
    p.add_argument("--child-timeout", type=int, default=240, help="seconds per pair")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output (default $OUT/bench_frontier.json or /tmp)")
    p.add_argument("--child", nargs=2, metavar=("ALLOCATOR", "WORKLOAD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    workloads = [w for w in args.workloads.split(",") if w]
    allocators = [a for a in args.allocators.split(",") if a]
    for w in workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r} (known: {', '.join(WORKLOADS)})")
    for a in allocators:
        if a not in ALLOCATORS:
            p.error(f"unknown allocator {a!r} (known: {', '.join(ALLOCATORS)})")
    out_path = args.out or os.path.join(os.environ.get("OUT") or "/tmp", "bench_frontier.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    log_path = os.path.splitext(out_path)[0] + ".log"
    pairs = [(w, a) for w in workloads for a in allocators]
    print(f"bench_frontier: {len(workloads)} workloads x {len(allocators)} allocators = {len(pairs)} pairs, "
          f"one process each: an uncapped run and up to {args.max_steps_bisect} bisection runs "
          f"(timeout {args.child_timeout} s a pair)", flush=True)
    if "tessera" in allocators:
        lib = os.environ.get("TESSERA_LIB") or os.path.join(REPO, "target", "release", "libtessera.so")
        if not os.path.isfile(lib):
            sys.exit(f"{lib} not found: cargo build --release first (or set TESSERA_LIB)")
    runner = Runner(args, log_path)
    rows = []
    for w, a in pairs:
        r = runner.run(a, w)
        r["workload"], r["allocator"] = w, a
        rows.append(r)
        peak = r.get("peak_allocated") or 0
        if r["status"] == "ok" and peak:
            fr = r.get("frontier")
            print(f"[{runner.count:3d}] {w:8s} {a:10s} peak allocated {gib(peak):.3f} GiB, reserved "
                  f"{r.get('peak_reserved', 0) / peak:.2f}x, frontier "
                  f"{'-' if fr is None else f'{fr / peak:.3f}x'} after {len(r.get('probes', []))} probes "
                  f"({r['elapsed_s']:.0f} s) {r.get('note', '')}", flush=True)
        else:
            print(f"[{runner.count:3d}] {w:8s} {a:10s} {r['status'].upper()}: {r.get('error', '')[:300]}", flush=True)

    for row in rows:
        peak = row.get("peak_allocated") or 0
        fr = row.get("frontier")
        row["peak_live"] = peak
        row["reserved_ratio"] = row["peak_reserved"] / peak if peak and row.get("peak_reserved") else None
        row["frontier_ratio"] = fr / peak if peak and fr else None
        usable = row.get("usable_frontier")
        row["usable_ratio"] = usable / peak if peak and usable else None
    device = next((r.get("device") for r in rows if r.get("device")), None)
    torch_v = next((r.get("torch") for r in rows if r.get("torch")), None)
    result = {"device": device, "torch": torch_v, "args": {k: v for k, v in vars(args).items() if k != "child"},
              "seconds": round(time.time() - runner.t_start, 1), "rows": rows}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{len(rows)} pairs in {result['seconds']:.0f} s on {device} (torch {torch_v}); "
          f"JSON: {out_path}; child logs: {log_path}")
    print("frontier: the least memory the allocator may take (free after a driver ballast, plus what it held "
          "between runs) with which the workload completes, to the bisection's resolution; '(> x)': the "
          "largest failing budget was x. Ratios over the allocator's own peak allocated. non-alloc: device "
          "memory the process took outside the allocator (left out of the frontier). usable: the memory the driver "
          "could hand out at the frontier (free after the ballast, less the floor below which it hands out "
          "nothing, to any allocator), plus what the allocator held, over peak allocated\n")
    print("| workload | allocator | peak live GiB | reserved ratio | frontier ratio | usable ratio | frontier GiB "
          "| non-alloc MiB | runs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        fr, peak = row.get("frontier"), row["peak_live"]
        fr_ratio = fmt_ratio(row["frontier_ratio"])
        probes = row.get("probes", [])
        if fr is None and probes and peak:
            fr_ratio = f"> {max(p['budget'] for p in probes) / peak:.2f}"
        elif fr is not None and peak:
            below = row["frontier_bracket"][0]
            if fr - below > row["resolution"] * 1.01:
                fr_ratio += f" (> {below / peak:.2f})"
        cells = [row["workload"], row["allocator"], f"{gib(peak):.3f}" if peak else "-",
                 fmt_ratio(row["reserved_ratio"]), fr_ratio, fmt_ratio(row["usable_ratio"]),
                 f"{gib(fr):.3f}" if fr else "-",
                 f"{row['nonalloc'] / MiB:.0f}" if row.get("nonalloc") is not None else "-",
                 str(1 + len(probes))]
        line = "| " + " | ".join(cells) + " |"
        if row.get("note") or row["status"] != "ok":
            line += f" {row.get('note') or row['status'] + ': ' + row.get('error', '')[:120]}"
        print(line)
    summary = ", ".join(f"{r['workload']}/{r['allocator']} {fmt_ratio(r['frontier_ratio'])}" for r in rows)
    note(f"frontier ratios: {summary}")


if __name__ == "__main__":
    main()
