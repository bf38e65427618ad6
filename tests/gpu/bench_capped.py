"""GPT-2 training throughput with tessera uncapped vs capped just above its own frontier (a benchmark).

    python3 tests/gpu/bench_capped.py [--steps 30] [--warmup 5] [--margin 0.05] [--bisect-steps 6]
        [--repeats 2] [--conf EXTRA] [--strict] [--out FILE]

The model is bench_frontier.py's gpt2 (GPT-2 124M from GPT2Config, AdamW, bf16 autocast), here
with a fixed batch of 8 x 512 (a new batch of token ids every step). Every run is its own
process with tessera installed:
1. uncapped, a few steps: peak allocated and peak reserved bytes;
2. the frontier: the least memory_limit (tessera's own cap on the physical memory it holds,
   set through install(conf=...): cheaper than a ballast, and it leaves out what the process
   takes outside the allocator) with which 5 training steps complete; bisection between peak
   allocated (assumed to fail) and the uncapped peak reserved, to max(1% of peak, 32 MiB),
   at most --bisect-steps runs;
3. throughput: --warmup steps, then --steps timed steps (one loss.item() sync a step, as a
   training loop that logs), uncapped and capped at memory_limit = frontier x (1 + --margin),
   alternated --repeats times (U C U C); the best steps/s of each.
Reports steps/s of each, the ratio capped / uncapped (target >= 0.95) and tessera's counters of
the capped run (retries, remaps). Exit status: 0, or 1 if a run failed (or, with --strict, if the
ratio is under 0.95). About 2 minutes on an H100 (about 12 child processes of 6-12 s each).
JSON to --out (default $OUT/bench_capped.json, else /tmp/bench_capped.json).
"""

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gpu_util import REPO, last_json, note  # noqa: E402
from bench_frontier import GRAIN, GiB, MiB, align, bisect, is_oom  # noqa: E402

BATCH, SEQ = 8, 512
TARGET = 0.95
COUNTERS = ("alloc_retries", "ooms", "reclaimed_granules", "driver_map_calls", "driver_unmap_calls",
            "driver_create_calls", "driver_release_calls", "cache_misses")


def child(args):
    out = {"limit": args.limit, "status": "error", "error": ""}
    code = 1
    try:
        import tessera_torch as tt
        parts = [c for c in (args.conf,) if c] + ([f"memory_limit:{args.limit}"] if args.limit > 0 else [])
        out["conf"] = ",".join(parts) or None
        tt.install(conf=out["conf"])
        import torch
        torch.cuda.init()
        from bench_frontier import build_gpt2, gpt2_step
        model, cfg = build_gpt2(torch, args.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        torch.manual_seed(args.seed)

        def step():
            x = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), device="cuda")
            return gpt2_step(torch, model, opt, x)

        try:
            for _ in range(args.warmup):
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.run_steps):
                loss = step()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            out.update(status="ok", steps_per_s=args.run_steps / dt, seconds=dt, loss=loss)
            code = 0
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            out["error"] = msg[:600]
            if is_oom(msg):
                out["status"], code = "oom", 3
        s = tt.stats()
        out.update(torch=torch.__version__, device=torch.cuda.get_device_name(),
                   peak_allocated=s["allocated_bytes"]["peak"], peak_reserved=s["reserved_bytes"]["peak"],
                   counters={k: s[k] for k in COUNTERS if k in s})
    except Exception as e:
        traceback.print_exc()
        out.update(status="error", error=f"{type(e).__name__}: {e}"[:600])
        code = 1
    sys.stderr.flush()
    print(json.dumps(out), flush=True)
    os._exit(code)


def run(args, limit, warmup, steps, log):
    env = dict(os.environ)
    env.pop("TESSERA_CONF", None)  # the child gets the whole conf through --conf
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.path.join(REPO, "python"), os.path.join(REPO, "examples"), HERE, env.get("PYTHONPATH")) if p)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--limit", str(int(limit)),
           "--warmup", str(warmup), "--run-steps", str(steps), "--seed", str(args.seed)]
    if args.conf:
        cmd += ["--conf", args.conf]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.child_timeout)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        rc = None
    secs = time.time() - t0
    summary = last_json(stdout)
    if summary is None:
        last = (stderr.strip().splitlines() or ["(no output)"])[-1]
        summary = {"limit": limit, "status": "timeout" if rc is None else "error",
                   "error": f"{'timed out' if rc is None else f'exit {rc}'} with no summary: {last}"[:600]}
    summary["elapsed_s"] = round(secs, 2)
    n = 8 if summary["status"] in ("ok", "oom") else 60
    log.write(f"===== limit={limit} warmup={warmup} steps={steps} -> {summary['status']} rc={rc} {secs:.1f}s\n"
              + "--- stdout\n" + "\n".join(stdout.splitlines()[-n:])
              + "\n--- stderr\n" + "\n".join(stderr.splitlines()[-n:]) + "\n")
    log.flush()
    return summary


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per throughput run")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--margin", type=float, default=0.05, help="cap = frontier x (1 + margin)")
    p.add_argument("--bisect-steps", type=int, default=6)
    p.add_argument("--bisect-run-steps", type=int, default=5, help="training steps per bisection run")
    p.add_argument("--repeats", type=int, default=2, help="throughput runs of each kind (alternated)")
    p.add_argument("--conf", default=os.environ.get("TESSERA_CONF"),
                   help="more tessera config (default: $TESSERA_CONF), without memory_limit")
    p.add_argument("--strict", action="store_true", help="exit 1 if the ratio is under 0.95")
    p.add_argument("--child-timeout", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--run-steps", type=int, default=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.conf and "memory_limit" in args.conf:
        p.error("--conf / TESSERA_CONF must not set memory_limit: this benchmark sets it")
    out_path = args.out or os.path.join(os.environ.get("OUT") or "/tmp", "bench_capped.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    log = open(os.path.splitext(out_path)[0] + ".log", "w")
    t_start = time.time()
    n_max = 1 + args.bisect_steps + 2 * args.repeats
    print(f"bench_capped: GPT-2 124M, batch {BATCH} x {SEQ}; at most {n_max} child runs "
          f"(1 uncapped, up to {args.bisect_steps} bisection, {2 * args.repeats} throughput); "
          f"expected about {n_max * 9 / 60:.1f} min on an H100", flush=True)
    result = {"batch": BATCH, "seq": SEQ, "args": {k: v for k, v in vars(args).items() if k not in ("child", "limit", "run_steps")}}

    def finish(code):
        result["seconds"] = round(time.time() - t_start, 1)
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"JSON: {out_path}; child logs: {log.name}")
        sys.exit(code)

    # 1. Uncapped: the peaks.
    u = run(args, 0, 0, args.bisect_run_steps, log)
    result["uncapped"] = u
    if u["status"] != "ok":
        print(f"uncapped run: {u['status']}: {u.get('error')}")
        note(f"uncapped run failed: {u['status']}")
        finish(1)
    peak, reserved = u["peak_allocated"], u["peak_reserved"]
    print(f"uncapped: peak allocated {peak / GiB:.3f} GiB, peak reserved {reserved / GiB:.3f} GiB "
          f"({reserved / peak:.3f}x) on {u.get('device')}", flush=True)

    # 2. The frontier, on memory_limit.
    res = max(0.01 * peak, 32 * MiB)
    lo, hi = align(peak), align(reserved + GRAIN - 1)
    if hi <= lo:
        hi = lo + GRAIN
    probes = []

    def probe(limit):
        r = run(args, limit, 0, args.bisect_run_steps, log)
        probes.append(r)
        print(f"  memory_limit {limit / GiB:.3f} GiB ({limit / peak:.3f}x peak) -> {r['status']}"
              f"{'' if r['status'] in ('ok', 'oom') else ': ' + r.get('error', '')[:200]} ({r['elapsed_s']:.1f} s)",
              flush=True)
        return r["status"] == "ok"

    frontier, verified, runs = bisect(probe, lo, hi, res, args.bisect_steps, [peak + res / 2 + GRAIN])
    result.update(probes=probes, frontier=frontier, resolution=int(res))
    if frontier is None:
        print(f"no memory_limit up to {hi / GiB:.3f} GiB let 5 steps complete")
        note("frontier not found")
        finish(1)
    cap = align(frontier * (1 + args.margin) + GRAIN - 1)
    result["cap"] = cap
    print(f"frontier: memory_limit {frontier / GiB:.3f} GiB ({frontier / peak:.3f}x peak allocated, "
          f"to {res / MiB:.0f} MiB, {runs} runs); capped runs use {cap / GiB:.3f} GiB "
          f"(+{args.margin:.0%})", flush=True)

    # 3. Throughput, alternated.
    best = {}
    runs_tp = []
    for _ in range(args.repeats):
        for kind, limit in (("uncapped", 0), ("capped", cap)):
            r = run(args, limit, args.warmup, args.steps, log)
            r["kind"] = kind
            runs_tp.append(r)
            if r["status"] != "ok":
                print(f"  {kind}: {r['status']}: {r.get('error', '')[:300]}", flush=True)
                continue
            print(f"  {kind:8s}: {r['steps_per_s']:.3f} steps/s, peak reserved "
                  f"{r['peak_reserved'] / GiB:.3f} GiB, counters {r.get('counters')}", flush=True)
            if r["steps_per_s"] > best.get(kind, {}).get("steps_per_s", 0):
                best[kind] = r
    result.update(throughput_runs=runs_tp, best=best)
    if "uncapped" not in best or "capped" not in best:
        note("a throughput run failed: " + ", ".join(f"{r['kind']} {r['status']}" for r in runs_tp))
        finish(1)
    ratio = best["capped"]["steps_per_s"] / best["uncapped"]["steps_per_s"]
    result["ratio"] = ratio
    over = best["capped"]["peak_reserved"] > cap
    print("\n| run | memory_limit GiB | steps/s | peak reserved GiB | retries | reclaimed granules | maps | unmaps |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in ("uncapped", "capped"):
        r, c = best[kind], best[kind].get("counters", {})
        print(f"| {kind} | {'-' if kind == 'uncapped' else f'{cap / GiB:.3f}'} | {r['steps_per_s']:.3f} | "
              f"{r['peak_reserved'] / GiB:.3f} | {c.get('alloc_retries', '-')} | {c.get('reclaimed_granules', '-')} | "
              f"{c.get('driver_map_calls', '-')} | {c.get('driver_unmap_calls', '-')} |")
    if cap >= reserved:
        print(f"(the cap is not below the uncapped run's peak reserved, {reserved / GiB:.3f} GiB: it may not bind)")
    verdict = "meets" if ratio >= TARGET else "BELOW"
    print(f"\ncapped / uncapped throughput: {ratio:.3f} ({verdict} the target {TARGET}); frontier "
          f"{frontier / peak:.3f}x peak allocated, cap {cap / peak:.3f}x"
          + ("; WARNING: the capped run's peak reserved exceeds the cap" if over else ""))
    note(f"capped/uncapped {ratio:.3f} ({verdict} {TARGET}) at cap {cap / GiB:.2f} GiB = frontier+{args.margin:.0%}, "
         f"frontier {frontier / peak:.3f}x peak")
    finish(1 if over or (args.strict and ratio < TARGET) else 0)


if __name__ == "__main__":
    main()
