"""OOM-frontier benchmark: tessera vs PyTorch's allocators, side by side (a benchmark, not a test).

    python3 tests/gpu/bench_frontier.py [--workloads gpt2,resnet,kvcache,churn]
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

Method. First one uncapped run per pair: peak allocated bytes ("peak live": max_memory_allocated,
tessera's allocated_bytes peak) and peak reserved bytes. Then the OOM frontier, the least free GPU
memory with which the workload still completes: the child takes a BALLAST with the CUDA driver
(cuMemAlloc on the primary context, before PyTorch or tessera touches CUDA) that leaves exactly
target_free bytes free (to 2 MiB), then runs the workload: exit 0 completed, 3 out of memory, other
an error. Bisection on target_free between peak allocated (assumed to fail) and 2 x peak + 1 GiB,
to max(1% of peak, 64 MiB), at most --max-steps-bisect runs per pair; the first probe is the
uncapped run's peak reserved plus the memory taken outside the allocator (usually a pass, which
narrows the range at once). The frontier counts everything the process takes after the ballast:
the allocator's reserved memory and the rest (kernel modules loaded lazily, cuBLAS/cuDNN handles),
shown as "non-alloc MiB" (measured in the uncapped run: device memory used minus reserved).

Prints the expected number of child runs first, progress lines, and a markdown table last:
workload | allocator | peak live GiB | reserved ratio | frontier ratio | frontier GiB | non-alloc MiB | runs
(ratios over that allocator's own peak allocated). Writes JSON to --out (default $OUT/bench_frontier.json,
else /tmp/bench_frontier.json) and every child's output tail to the .log beside it.
Default run: 16 pairs, at most 96 child runs; about 5-8 minutes on an H100 (--budget-min trims the
bisection steps if the uncapped runs show that the budget would be exceeded).
"""

import argparse
import ctypes
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
from gpu_util import REPO, last_json, note  # noqa: E402  (gpu_util also puts python_example on sys.path)

MiB, GiB = 1 << 20, 1 << 30
GRAIN = 2 * MiB

ALLOCATORS = {  # name -> PYTORCH_CUDA_ALLOC_CONF (None: unset)
    "tessera": None,
    "native": None,
    "expandable": "expandable_segments:True",
    "async": "backend:cudaMallocAsync",
}
EXIT_OK, EXIT_OOM, EXIT_BALLAST = 0, 3, 4
# Rough seconds per child on an H100 (process start, imports, CUDA init, the workload): for the
# estimate printed before anything runs; the budget then uses the measured times.
EST_CHILD_S = {"gpt2": 8.0, "resnet": 8.0, "kvcache": 4.0, "churn": 4.0}


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


WORKLOADS = {"gpt2": wl_gpt2, "resnet": wl_resnet, "kvcache": wl_kvcache, "churn": wl_churn}
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
        extra = {k: s[k] for k in ("alloc_retries", "ooms", "reclaimed_granules", "driver_map_calls",
                                   "driver_unmap_calls") if k in s}
        return peak_alloc, peak_res, s["reserved_bytes"]["current"], extra
    extra = {}
    try:
        ms = torch.cuda.memory_stats()
        extra = {k: ms[k] for k in ("num_alloc_retries", "num_ooms") if k in ms}
    except Exception as e:  # some keys are missing with cudaMallocAsync
        extra = {"memory_stats_error": str(e)[:200]}
    return (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved(),
            torch.cuda.memory_reserved(), extra)


def child(args):
    out = {"allocator": args.child[0], "workload": args.child[1], "target_free": args.target_free,
           "status": "error", "error": ""}
    code = 1
    try:
        which, workload = args.child
        drv = Driver()
        free0, total = drv.mem_info()
        out.update(free_at_start=free0, total=total)
        if args.target_free >= 0:
            if free0 < args.target_free:
                out.update(status="insufficient", error=f"only {free0} bytes free at start")
                print(json.dumps(out), flush=True)
                os._exit(EXIT_BALLAST)
            out["ballast"] = drv.take_ballast(args.target_free)
        free1, _ = drv.mem_info()
        out["free_after_ballast"] = free1
        if args.target_free >= 0 and free1 > args.target_free + 8 * MiB:
            out.update(status="ballast", error=f"the ballast left {free1} bytes free, wanted {args.target_free}")
            print(json.dumps(out), flush=True)
            os._exit(EXIT_BALLAST)
        tt = None
        if which == "tessera":
            import tessera_torch as tt
            tt.install()
        import torch
        torch.cuda.init()
        out.update(torch=torch.__version__, device=torch.cuda.get_device_name(),
                   alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                   tessera_conf=os.environ.get("TESSERA_CONF") if tt else None)
        t0 = time.time()
        try:
            out["steps"] = WORKLOADS[workload](torch, args.seed, args.steps)
            torch.cuda.synchronize()
            out["status"], code = "ok", EXIT_OK
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            out["error"] = msg[:600]
            traceback.print_exc()
            if is_oom(msg):
                out["status"], code = "oom", EXIT_OOM
                out["oom_from_allocator"] = "Tried to allocate" in msg
        out["workload_s"] = round(time.time() - t0, 2)
        try:
            peak_alloc, peak_res, res_now, extra = allocator_stats(torch, tt)
            free2, _ = drv.mem_info()
            out.update(peak_allocated=peak_alloc, peak_reserved=peak_res, reserved_end=res_now,
                       free_end=free2, nonalloc=(free1 - free2) - res_now, stats=extra)
        except Exception as e:
            out["stats_error"] = f"{type(e).__name__}: {e}"[:300]
    except Exception as e:  # setup failed
        traceback.print_exc()
        out.update(status="error", error=f"{type(e).__name__}: {e}"[:600])
        code = 1
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

    def run(self, which, workload, target_free=-1):
        a = self.args
        env = dict(os.environ)
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        if ALLOCATORS[which]:
            env["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATORS[which]
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (os.path.join(REPO, "python_example"), HERE, env.get("PYTHONPATH")) if p)
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", which, workload,
               "--target-free", str(int(target_free)), "--seed", str(a.seed), "--steps", str(a.steps)]
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
            summary = {"allocator": which, "workload": workload, "target_free": target_free,
                       "status": "timeout" if timed_out else "error",
                       "error": f"{'timed out' if timed_out else f'exit {rc}'} with no summary: {last}"[:600]}
        summary["rc"], summary["elapsed_s"] = rc, round(secs, 2)
        n = 60 if summary["status"] not in ("ok", "oom") else 8
        self.log.write(f"===== {which} {workload} target_free={target_free} -> {summary['status']} "
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


def choose_steps(rows, max_steps, budget_left_s):
    """Most bisection steps per pair (<= max_steps, >= 2) for the pairs of rows, if each step
    costs what the pair's uncapped run took, within budget_left_s (<= 0: no limit).
    Returns (steps, seconds of one step over all of rows)."""
    per_step = sum(r["uncapped"].get("elapsed_s", 0) for r in rows if r["uncapped"]["status"] == "ok")
    steps = max_steps
    if budget_left_s is not None and per_step > 0:
        while steps > 2 and steps * per_step > budget_left_s:
            steps -= 1
    return steps, per_step


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--allocators", default=",".join(ALLOCATORS))
    p.add_argument("--steps", type=float, default=1.0, help="scales every workload's steps")
    p.add_argument("--max-steps-bisect", type=int, default=5)
    p.add_argument("--budget-min", type=float, default=8.0,
                   help="trim bisection steps (down to 2) to end in about this many minutes; 0: no limit")
    p.add_argument("--child-timeout", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output (default $OUT/bench_frontier.json or /tmp)")
    # the child's own arguments
    p.add_argument("--child", nargs=2, metavar=("ALLOCATOR", "WORKLOAD"), help=argparse.SUPPRESS)
    p.add_argument("--target-free", type=int, default=-1, help=argparse.SUPPRESS)
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
    n_max = len(pairs) * (1 + args.max_steps_bisect)
    est = sum(EST_CHILD_S[w] * (1 + 0.7 * args.max_steps_bisect) for w, _ in pairs) * max(1.0, args.steps ** 0.5)
    print(f"bench_frontier: {len(workloads)} workloads x {len(allocators)} allocators = {len(pairs)} pairs; "
          f"at most {n_max} child runs ({len(pairs)} uncapped + up to {args.max_steps_bisect} bisection "
          f"each, timeout {args.child_timeout} s each); expected about {est / 60:.1f} min"
          + (f" (budget {args.budget_min:g} min)" if args.budget_min > 0 else ""), flush=True)
    if "tessera" in allocators:
        lib = os.environ.get("TESSERA_LIB") or os.path.join(REPO, "target", "release", "libtessera.so")
        if not os.path.isfile(lib):
            sys.exit(f"{lib} not found: cargo build --release first (or set TESSERA_LIB)")
    runner = Runner(args, log_path)

    # Phase 1: uncapped runs.
    rows = []
    for w, a in pairs:
        r = runner.run(a, w)
        row = {"workload": w, "allocator": a, "uncapped": r, "probes": []}
        rows.append(row)
        if r["status"] == "ok":
            pa, pr = r.get("peak_allocated", 0), r.get("peak_reserved", 0)
            print(f"[{runner.count:3d}] {w:8s} {a:10s} uncapped: peak allocated {gib(pa):.3f} GiB, "
                  f"reserved {gib(pr):.3f} GiB ({pr / max(pa, 1):.2f}x), non-alloc "
                  f"{r.get('nonalloc', 0) / MiB:.0f} MiB, {r['elapsed_s']:.1f} s", flush=True)
        else:
            print(f"[{runner.count:3d}] {w:8s} {a:10s} uncapped: {r['status'].upper()}: {r.get('error', '')[:300]}",
                  flush=True)

    # Phase 2: bisection on the free memory left by the ballast. The steps per pair are chosen
    # again before each pair, so that time saved on one pair goes to the next.
    budget_s = args.budget_min * 60

    def budget_left():
        return budget_s - (time.time() - runner.t_start) if budget_s > 0 else None

    steps, per_step = choose_steps(rows, args.max_steps_bisect, budget_left())
    print(f"uncapped runs took {time.time() - runner.t_start:.0f} s; bisection: up to {steps} steps per pair, "
          f"about {per_step:.0f} s per step over all pairs (at most {steps * per_step / 60:.1f} min more)",
          flush=True)
    steps_used = []
    for i, row in enumerate(rows):
        u = row["uncapped"]
        if u["status"] != "ok" or not u.get("peak_allocated"):
            row["note"] = f"uncapped run {u['status']}"
            continue
        w, a = row["workload"], row["allocator"]
        peak = u["peak_allocated"]
        lo, hi = align(peak), align(2 * peak + GiB + GRAIN - 1)
        if u.get("free_at_start"):
            hi = min(hi, align(u["free_at_start"]))
        res = max(0.01 * peak, 64 * MiB)
        nonalloc = min(max(u.get("nonalloc", 0), 0), 2 * GiB)
        # First what the uncapped run held (usually a pass, which narrows the range at once), then
        # what a perfect allocator would need (peak live and the same memory outside it).
        guesses = [u.get("peak_reserved", 0) + nonalloc + max(res, 0.02 * peak), peak + nonalloc + res / 2]

        def probe(target, w=w, a=a, row=row):
            r = runner.run(a, w, target)
            row["probes"].append(r)
            ok = r["status"] == "ok"
            print(f"[{runner.count:3d}] {w:8s} {a:10s} free {gib(target):7.3f} GiB -> {r['status']}"
                  f"{'' if r['status'] in ('ok', 'oom') else ': ' + r.get('error', '')[:200]} "
                  f"({r['elapsed_s']:.1f} s)", flush=True)
            return ok

        new_steps, _ = choose_steps(rows[i:], args.max_steps_bisect, budget_left())
        if new_steps != steps:
            print(f"(bisection steps per pair now {new_steps}, to keep within --budget-min {args.budget_min:g})")
            steps = new_steps
        steps_used.append(steps)
        frontier, verified, runs = bisect(probe, lo, hi, res, steps, guesses)
        failed = [r["target_free"] for r in row["probes"] if r["status"] != "ok"]
        row.update(frontier=frontier, frontier_verified=verified, bisect_lo=lo, bisect_hi=hi,
                   resolution=int(res), bisect_runs=runs,
                   frontier_bracket=[max([lo] + [f for f in failed if frontier is None or f < frontier]),
                                     frontier])
        if frontier is None:
            tried = max([lo] + [r["target_free"] for r in row["probes"]])
            row["note"] = f"no pass up to {gib(tried):.2f} GiB free (upper bound {gib(hi):.2f})"
        errors = [r for r in row["probes"] if r["status"] not in ("ok", "oom")]
        if errors:
            row["note"] = (row.get("note", "") + f" {len(errors)} probe(s) failed otherwise: "
                           f"{errors[0]['status']} {errors[0].get('error', '')[:120]}").strip()

    # Report.
    for row in rows:
        u = row["uncapped"]
        peak = u.get("peak_allocated") or 0
        fr = row.get("frontier")
        row["peak_live"] = peak
        row["nonalloc"] = u.get("nonalloc")
        row["reserved_ratio"] = u["peak_reserved"] / peak if peak and u.get("peak_reserved") else None
        row["frontier_ratio"] = fr / peak if peak and fr else None
        # The frontier less what the process took outside the allocator in the uncapped run.
        row["frontier_ratio_adjusted"] = ((fr - max(row["nonalloc"] or 0, 0)) / peak
                                          if peak and fr and row["nonalloc"] is not None else None)
    device = next((r["uncapped"].get("device") for r in rows if r["uncapped"].get("device")), None)
    torch_v = next((r["uncapped"].get("torch") for r in rows if r["uncapped"].get("torch")), None)
    result = {"device": device, "torch": torch_v, "args": {k: v for k, v in vars(args).items() if k != "child"},
              "child_runs": runner.count, "seconds": round(time.time() - runner.t_start, 1),
              "bisect_steps": steps_used, "rows": rows}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{runner.count} child runs in {result['seconds']:.0f} s on {device} (torch {torch_v}); "
          f"JSON: {out_path}; child logs: {log_path}")
    print("frontier: the least free GPU memory (after a driver ballast) with which the workload completes, "
          "to the bisection's resolution; '(> x)': not bracketed closer, the frontier lies above x. Ratios "
          "over the allocator's own peak allocated. non-alloc: device memory the process took outside the "
          "allocator in the uncapped run (kernel modules, library handles), which the frontier includes; "
          "adj.: (frontier - non-alloc) / peak live\n")
    print("| workload | allocator | peak live GiB | reserved ratio | frontier ratio | frontier GiB "
          "| non-alloc MiB | adj. frontier ratio | runs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        fr, peak = row.get("frontier"), row["peak_live"]
        fr_ratio = fmt_ratio(row["frontier_ratio"])
        if fr is None and row.get("bisect_hi") and peak:  # every probe failed
            fr_ratio = f"> {max([row['bisect_lo']] + [r['target_free'] for r in row['probes']]) / peak:.2f}"
        elif fr is not None and peak:
            below = row["frontier_bracket"][0]
            if fr - below > row["resolution"] * 1.01:
                fr_ratio += f" (> {below / peak:.2f})"
        cells = [row["workload"], row["allocator"], f"{gib(peak):.3f}" if peak else "-",
                 fmt_ratio(row["reserved_ratio"]), fr_ratio, f"{gib(fr):.3f}" if fr else "-",
                 f"{row['nonalloc'] / MiB:.0f}" if row["nonalloc"] is not None else "-",
                 fmt_ratio(row["frontier_ratio_adjusted"]), str(1 + len(row["probes"]))]
        line = "| " + " | ".join(cells) + " |"
        if row.get("note"):
            line += f" {row['note']}"
        print(line)
    summary = ", ".join(f"{r['workload']}/{r['allocator']} {fmt_ratio(r['frontier_ratio'])}" for r in rows)
    note(f"frontier ratios: {summary}")

if __name__ == "__main__":
    main()
