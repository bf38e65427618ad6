"""Reclamation on the real GPU: under a 1 GiB + 16 MiB cap (16 MiB for the small
temporaries of the checks), 16 x 64 MiB tensors fill the cap; every other one is freed (512 MiB free in 64 MiB holes); a 512 MiB tensor
must still fit, by unmapping the free granules and mapping them where it goes.
The survivors keep their data; the new tensor is fully writable."""

from gpu_util import MiB, check, install, note, settle

torch, tt = install(conf="memory_limit:1040M")
chunk = 64 * MiB
held = []
for i in range(16):
    t = torch.empty(chunk, dtype=torch.uint8, device="cuda")
    t.fill_(i + 1)
    held.append(t)
for i in range(0, 16, 2):
    held[i] = None
settle(torch)
before = tt.stats()
big = torch.empty(512 * MiB, dtype=torch.uint8, device="cuda")
big.fill_(200)
torch.cuda.synchronize()
after = tt.stats()
# min/max reduce without a tensor of the input's size: there is no room for one.
def uniform(t, v):
    return t.min().item() == v and t.max().item() == v


check(uniform(big, 200), "the remapped 512 MiB tensor reads back wrong")
for i in range(1, 16, 2):
    check(uniform(held[i], i + 1), f"survivor {i} changed after the remap")
reclaimed = after["reclaimed_granules"] - before["reclaimed_granules"]
check(reclaimed >= 256, f"expected >= 256 granules reclaimed, got {reclaimed}")
check(after["reserved_bytes"]["peak"] <= 1040 * MiB, f"peak reserved {after['reserved_bytes']['peak']} over the cap")
try:
    torch.empty(64 * MiB, dtype=torch.uint8, device="cuda")
    raise AssertionError("a 64 MiB tensor fit in the 16 MiB left under the cap")
except RuntimeError as e:
    check(str(e).startswith("CUDA out of memory. Tried to allocate"), f"bad OOM message: {e}")
del big
settle(torch)
x = torch.randn(1024, 1024, device="cuda")
check(torch.isfinite(x @ x).all().item(), "matmul after OOM failed")
note(f"512 MiB served from 8 holes of 64 MiB; {reclaimed} granules remapped")
