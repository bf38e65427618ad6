"""Train a small GPT on synthetic data with tessera as PyTorch's CUDA allocator.

    PYTHONPATH=python python3 examples/train_gpt.py --steps 50
    PYTHONPATH=python python3 examples/train_gpt.py --steps 50 --native   # for comparison

Each step draws a batch size and a sequence length at random, so the allocator sees
ever-changing tensor sizes. The data are arithmetic sequences modulo the vocabulary
(start and stride random per sequence), which the model can learn, so the loss falls.
Prints loss and allocator stats every 10 steps, and a one-line JSON summary last.
With the same --seed, native and tessera runs give the same losses (deterministic kernels).
"""

import argparse
import json
import math
import os
import sys
import time

# Deterministic cuBLAS; must be set before CUDA initialises.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))

MiB = float(1 << 20)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--native", action="store_true", help="use PyTorch's native allocator")
    p.add_argument("--plug-in", action="store_true",
                   help="install tessera as a plain plug-in, not through the torch adaptor")
    p.add_argument("--conf", default=None, help="tessera config string (TESSERA_CONF syntax)")
    p.add_argument("--lib", default=None, help="path of libtessera.so")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--print-every", type=int, default=10)
    return p.parse_args()


def build_model(torch, args):
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x, mask):
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
            q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
            # Plain attention (no fused SDPA kernel): deterministic forward and backward.
            att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
            att = att.masked_fill(mask[:t, :t], float("-inf")).softmax(dim=-1)
            y = (att @ v).transpose(1, 2).reshape(b, t, d)
            x = x + self.proj(y)
            return x + self.mlp(self.ln2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            d = args.d_model
            self.tok, self.pos = nn.Embedding(args.vocab, d), nn.Embedding(args.max_len, d)
            self.blocks = nn.ModuleList(Block(d, args.heads) for _ in range(args.layers))
            self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, args.vocab, bias=False)
            causal = torch.ones(args.max_len, args.max_len, dtype=torch.bool).triu(1)
            self.register_buffer("mask", causal, persistent=False)

        def forward(self, idx):
            t = idx.shape[1]
            x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
            for blk in self.blocks:
                x = blk(x, self.mask)
            return self.head(self.ln(x))

    return GPT()


def make_batch(torch, gen, args):
    """Arithmetic sequences mod vocab; random batch size and length; drawn on the CPU."""
    batch = int(torch.randint(8, 33, (1,), generator=gen))
    length = int(torch.randint(32, args.max_len + 1, (1,), generator=gen))
    start = torch.randint(0, args.vocab, (batch, 1), generator=gen)
    stride = torch.randint(1, 17, (batch, 1), generator=gen)
    seq = (start + stride * torch.arange(length + 1)) % args.vocab
    return seq[:, :-1], seq[:, 1:]


def memory_line(torch, tessera):
    if tessera is not None:
        s = tessera.stats()
        a, r = s["allocated_bytes"], s["reserved_bytes"]
        return (f"alloc {a['current'] / MiB:8.1f} MiB (peak {a['peak'] / MiB:8.1f})  "
                f"reserved {r['current'] / MiB:8.1f} MiB (peak {r['peak'] / MiB:8.1f})  "
                f"hits {s['cache_hits']} misses {s['cache_misses']}")
    return (f"alloc {torch.cuda.memory_allocated() / MiB:8.1f} MiB "
            f"(peak {torch.cuda.max_memory_allocated() / MiB:8.1f})  "
            f"reserved {torch.cuda.memory_reserved() / MiB:8.1f} MiB "
            f"(peak {torch.cuda.max_memory_reserved() / MiB:8.1f})")


# What the timed window cost the allocator. tessera: allocations, cache misses (allocations
# that needed memory no cached block held), ready-reserve hits, driver calls and their time on
# the allocating thread and on tessera's driver thread. native: cudaMalloc/cudaFree calls
# (segment allocations and frees) and retries.
TESSERA_COUNTERS = ("cache_hits", "cache_misses", "ready_hits", "driver_calls", "driver_ns",
                    "background_driver_calls", "background_driver_ns", "driver_map_calls",
                    "driver_unmap_calls", "driver_create_calls", "reclaimed_granules")
NATIVE_COUNTERS = ("segment.all.allocated", "segment.all.freed", "num_alloc_retries",
                   "allocation.all.allocated")


def counters(torch, tessera):
    if tessera is not None:
        s = tessera.stats()
        return {k: s[k] for k in TESSERA_COUNTERS}
    s = torch.cuda.memory_stats()
    return {k: s.get(k, 0) for k in NATIVE_COUNTERS}


def main():
    args = parse_args()
    tessera = path = None
    if not args.native:
        import tessera_torch as tessera  # noqa: PLC0415
        path = tessera.install(lib_path=args.lib, conf=args.conf, adaptor=not args.plug_in)  # before any CUDA use
    import torch

    if not torch.cuda.is_available():
        sys.exit("train_gpt.py needs a CUDA GPU")
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")

    model = build_model(torch, args).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)  # data: CPU generator, same in both runs
    print(f"allocator: {'native' if tessera is None else 'tessera ' + tessera.version()}  "
          f"params: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M", flush=True)

    # The process's own speed, for comparing runs: us per launch of a small kernel that
    # allocates nothing. On shared GPU hosts it differs between processes by up to 2x
    # whatever the allocator (tests/gpu/diag_launch.py).
    probe = torch.ones(256, device=dev)
    for _ in range(2):
        t_probe = time.perf_counter()
        for _ in range(5000):
            torch.add(probe, probe, out=probe)
        torch.cuda.synchronize()
        launch_us = (time.perf_counter() - t_probe) / 5000 * 1e6
    del probe

    losses, warmup, t0 = [], min(5, args.steps), None
    for step in range(1, args.steps + 1):
        if step == warmup + 1:  # time the steady state only
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            before = counters(torch, tessera)
        x, y = make_batch(torch, gen, args)
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, args.vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % args.print_every == 0 or step == args.steps:
            print(f"step {step:5d}  loss {losses[-1]:.4f}  {memory_line(torch, tessera)}", flush=True)
    torch.cuda.synchronize()
    timed = args.steps - warmup
    steps_per_s = timed / (time.perf_counter() - t0) if timed > 0 else float("nan")
    window = {k: v - before[k] for k, v in counters(torch, tessera).items()} if timed > 0 else {}

    if tessera is not None:
        s = tessera.stats()
        peak_reserved, peak_alloc = s["reserved_bytes"]["peak"], s["allocated_bytes"]["peak"]
    else:
        peak_reserved, peak_alloc = torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
    print(json.dumps({
        "allocator": "native" if tessera is None else "tessera",
        "path": None if tessera is None else path,
        "steps": args.steps, "final_loss": losses[-1], "steps_per_s": round(steps_per_s, 3),
        "peak_reserved_mib": round(peak_reserved / MiB, 1),
        "peak_allocated_mib": round(peak_alloc / MiB, 1),
        "launch_us": round(launch_us, 3),
        "timed_window": window,
        "losses": losses,
    }), flush=True)


if __name__ == "__main__":
    main()
