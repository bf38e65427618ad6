"""Where a training step's time goes, native vs tessera (a diagnostic, not a test):
    python3 tests/gpu/prof_step.py native|tessera [--conf STRING]
Trains train_gpt.py's model 20 steps, then profiles 5 and prints the wall time per
step, the GPU busy time, and the ops with the most CPU self time."""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "python"))
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
which = sys.argv[1]
conf = sys.argv[3] if len(sys.argv) > 3 else None
if which == "tessera":
    import tessera_torch
    tessera_torch.install(conf=conf)
import torch
import train_gpt

sys.argv = ["train_gpt.py"]
args = train_gpt.parse_args()
torch.manual_seed(0)
torch.use_deterministic_algorithms(True, warn_only=True)
model = train_gpt.build_model(torch, args).cuda()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
gen = torch.Generator().manual_seed(0)


def step():
    x, y = train_gpt.make_batch(torch, gen, args)
    x, y = x.cuda(non_blocking=True), y.cuda(non_blocking=True)
    loss = torch.nn.functional.cross_entropy(model(x).view(-1, args.vocab), y.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


for _ in range(20):
    step()
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(20):
    step()
torch.cuda.synchronize()
print(f"{which}: {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms/step (20 steps, no profiler)")
from torch.profiler import ProfilerActivity, profile

with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        step()
    torch.cuda.synchronize()
ka = prof.key_averages()
cuda_us = sum(e.self_device_time_total for e in ka)
print(f"{which}: GPU busy {cuda_us / 5 / 1e3:.2f} ms/step")
print(ka.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))
if which == "tessera":
    s = tessera_torch.stats()
    print({k: s[k] for k in ("cache_hits", "cache_misses", "driver_map_calls", "driver_create_calls", "driver_unmap_calls")})
