"""Does growing the pool wait for the GPU? (a diagnostic, not a test)
    python3 tests/gpu/diag_growth.py native|tessera
Queues a long kernel, then times allocations that must grow the pool."""
import os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "python"))
which = sys.argv[1]
if which == "tessera":
    import tessera_torch
    tessera_torch.install(conf=sys.argv[2] if len(sys.argv) > 2 else None)
import torch
torch.ones(1, device="cuda")
torch.cuda.synchronize()
keep = []
for mib in (1, 6, 40, 200):
    times = []
    for i in range(5):
        torch.cuda._sleep(200_000_000)  # ~100 ms of GPU time queued
        t0 = time.perf_counter()
        keep.append(torch.empty((mib << 20) + i * 4096, dtype=torch.uint8, device="cuda"))
        times.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    print(f"{which}: new {mib} MiB tensors with the GPU busy: " + " ".join(f"{t:.2f}" for t in times) + " ms")
