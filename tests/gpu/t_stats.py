"""Stats parity: torch.cuda.memory_stats() of the native allocator against
tessera_torch.memory_stats(), step by step, on the same deterministic training steps.

Three child processes run train_gpt.py's model and batches (same seed, so the same tensor
sizes in the same order) and print allocated_bytes.all.current / requested_bytes.all.current
and their peaks (reset each phase) after the forward, the backward and the optimizer step
of every step:
  native             PyTorch's allocator, default settings (printed, requested compared)
  native_expandable  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  tessera            tessera_torch.memory_stats()
requested_bytes must be equal in all three (it is what the program asked for). allocated_bytes
must equal native_expandable's exactly: both round to 512 B and split off every remainder of
at least 512 B (native's default allocator keeps whole blocks when the rest is small, so it
can differ).
"""

import argparse
import json
import os
import subprocess
import sys

from gpu_util import REPO, check, install, note

STEPS = 12
KEYS = ("allocated_bytes.all.current", "requested_bytes.all.current",
        "allocated_bytes.all.peak", "requested_bytes.all.peak")
MODES = {
    "native": {"PYTORCH_CUDA_ALLOC_CONF": ""},
    "native_expandable": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
    "tessera": {},
}


def child(mode):
    import train_gpt  # examples/ (gpu_util put it on sys.path); sets CUBLAS_WORKSPACE_CONFIG
    if mode == "tessera":
        torch, tt = install()
        read, reset_peaks = tt.memory_stats, tt.reset_peak_memory_stats
    else:
        import torch
        read, reset_peaks = torch.cuda.memory_stats, torch.cuda.reset_peak_memory_stats

    def point(label):
        torch.cuda.synchronize()
        s = read()
        series.append([label] + [s[k] for k in KEYS])

    args = argparse.Namespace(vocab=1024, d_model=256, layers=4, heads=4, max_len=256, seed=0)
    torch.manual_seed(args.seed)
    dev = torch.device("cuda")
    series = []
    model = train_gpt.build_model(torch, args).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(args.seed)
    point("init")
    for step in range(1, STEPS + 1):
        reset_peaks()  # peaks per phase from here on
        x, y = train_gpt.make_batch(torch, gen, args)
        x, y = x.to(dev), y.to(dev)
        loss = torch.nn.functional.cross_entropy(model(x).view(-1, args.vocab), y.reshape(-1))
        point(f"{step}.fwd")   # activations live
        opt.zero_grad(set_to_none=True)
        loss.backward()
        point(f"{step}.bwd")   # gradients live
        reset_peaks()
        opt.step()
        loss.item()
        del x, y, loss
        point(f"{step}.opt")
    print(json.dumps({"mode": mode, "series": series}), flush=True)


def run(mode):
    env = dict(os.environ, **MODES[mode])
    if not env.get("PYTORCH_CUDA_ALLOC_CONF"):
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    proc = subprocess.run([sys.executable, __file__, mode], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=150)
    sys.stderr.write(proc.stderr[-3000:])
    check(proc.returncode == 0, f"{mode} child exited {proc.returncode}")
    line = [l for l in proc.stdout.splitlines() if l.startswith("{")][-1]
    return json.loads(line)["series"]


def main():
    series = {mode: run(mode) for mode in MODES}
    names = list(MODES)
    labels = [row[0] for row in series["tessera"]]
    for mode in names:
        check([row[0] for row in series[mode]] == labels, f"{mode}: different points")
    print(f"{'point':>7} " + " ".join(f"{m + ' alloc':>24} {m + ' req':>22}" for m in names))
    for i, label in enumerate(labels):
        print(f"{label:>7} " + " ".join(f"{series[m][i][1]:>24} {series[m][i][2]:>22}" for m in names))
    problems = []
    tes, exp, nat = series["tessera"], series["native_expandable"], series["native"]
    for i, label in enumerate(labels):
        for k, key in enumerate(KEYS, start=1):
            if tes[i][k] != exp[i][k]:
                problems.append(f"{label} {key}: tessera {tes[i][k]} native_expandable {exp[i][k]} "
                                f"(diff {tes[i][k] - exp[i][k]:+d})")
            if "requested" in key and tes[i][k] != nat[i][k]:
                problems.append(f"{label} {key}: tessera {tes[i][k]} native {nat[i][k]}")
    default_diff = sum(1 for i in range(len(labels)) if tes[i][1] != nat[i][1])
    print(f"allocated_bytes differs from native (default settings) at {default_diff} of {len(labels)} "
          f"points (allowed: its large-pool blocks keep remainders under 1 MiB unsplit)")
    for p in problems[:40]:
        print("DIFF", p)
    peak = max(row[3] for row in tes)
    note(f"{len(problems)} differences over {len(labels)} points x {len(KEYS)} keys; peak allocated "
         f"{peak} B = native expandable's; default native differs at {default_diff}" if not problems
         else f"{len(problems)} differences; first: {problems[0]}")
    check(not problems, f"{len(problems)} stats differ from native")
    print("STATS PARITY OK")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        child(sys.argv[1])
    else:
        main()
