"""Smoke test: tensors of awkward sizes, stats, empty_cache hook, record_stream hook."""

from gpu_util import MiB, check, install, note, settle

torch, tt = install()
dev = "cuda"
base = tt.stats()
print("stats after CUDA init:", {k: (v["current"] if isinstance(v, dict) else v) for k, v in base.items()})


def pattern(n, i):
    """n bytes 0,1,2,...255,0,1,... shifted by i (uint8 arithmetic wraps)."""
    return (torch.arange(256, dtype=torch.uint8) + i).repeat(n // 256 + 1)[:n]


# 1. Sizes 0 .. 100 MiB, all live together, each with its own byte pattern.
sizes = [0, 1, 511, 512, 1 * MiB, 100 * MiB]
tensors = [torch.empty(n, dtype=torch.uint8, device=dev) for n in sizes]
spans = []
for n, t in zip(sizes, tensors):
    if n:
        p = t.data_ptr()
        check(p != 0, f"NULL data_ptr for {n} bytes")
        check(p % 256 == 0, f"data_ptr {p:#x} of a {n}-byte tensor is not 256-byte aligned")
        spans.append((p, p + n))
spans.sort()
check(all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"live tensors overlap: {spans}")
for i, (n, t) in enumerate(zip(sizes, tensors)):
    t.copy_(pattern(n, i))
live = tt.stats()
torch.cuda.synchronize()
for i, (n, t) in enumerate(zip(sizes, tensors)):
    check(torch.equal(t.cpu(), pattern(n, i)), f"{n}-byte tensor read back wrong")
    if n:  # and a kernel writing all of it
        t.fill_(i + 1)
        check(bool(t.eq(i + 1).all()), f"{n}-byte tensor fill_ read back wrong")
grew = live["allocated_bytes"]["current"] - base["allocated_bytes"]["current"]
check(grew >= sum(sizes), f"allocated_bytes grew by {grew} < {sum(sizes)} with all tensors live")
check(live["requested_bytes"]["current"] - base["requested_bytes"]["current"] >= sum(sizes),
      "requested_bytes did not grow by the sizes asked")

# 2. Everything freed: allocated back to where it started.
del tensors, t
settle(torch)
freed = tt.stats()
for g in ("allocated_bytes", "requested_bytes", "active_blocks"):
    check(freed[g]["current"] == base[g]["current"],
          f"{g} not back to start after del+gc: {base[g]['current']} -> {freed[g]['current']}")

# 3. Compute works on this memory (cuBLAS keeps a workspace allocated from now on).
a = torch.randn(512, 384, device=dev)
b = torch.randn(384, 256, device=dev)
ref = a.cpu().double() @ b.cpu().double()
check(torch.allclose((a @ b).cpu().double(), ref, atol=1e-3, rtol=1e-3), "matmul result wrong")
del a, b, ref

# 4. Same size again and again: cache hits.
hits0 = tt.stats()["cache_hits"]
for _ in range(100):
    x = torch.empty(MiB, dtype=torch.uint8, device=dev)
    del x
hits = tt.stats()["cache_hits"] - hits0
check(hits >= 90, f"only {hits} cache hits in 100 same-size allocations")

# 5. torch.cuda.empty_cache() reaches tessera (the reset hook).
settle(torch)
before = tt.stats()["reserved_bytes"]["current"]
torch.cuda.empty_cache()
s = tt.stats()
after, in_use = s["reserved_bytes"]["current"], s["allocated_bytes"]["current"]  # in use: cuBLAS workspace
print(f"reserved before empty_cache {before / MiB:.1f} MiB, after {after / MiB:.1f} MiB, "
      f"allocated {in_use / MiB:.1f} MiB")
check(after <= in_use + 32 * MiB, f"reserved_bytes still {after / MiB:.1f} MiB after empty_cache")
check(before <= in_use + 32 * MiB or after < before, "empty_cache released nothing")

# 6. record_stream: memory read on a side stream must not be reused before that read is done.
side = torch.cuda.Stream()
for rep in range(10):
    n = (16 + 8 * rep) * MiB // 4
    x = torch.full((n,), 7.0, device=dev)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keep the side stream busy (tens of ms) before it reads x
        y = x * 2
    x.record_stream(side)
    del x
    # Same-size allocations on the default stream, overwritten at once.
    junk = [torch.full((n,), -1.0, device=dev) for _ in range(3)]
    torch.cuda.synchronize()
    check(bool(y.eq(14.0).all()), f"rep {rep}: side-stream result corrupted: record_stream not honoured")
    del y, junk

# 7. set_per_process_memory_fraction reaches the memory-fraction hook without harm.
torch.cuda.set_per_process_memory_fraction(1.0)
z = torch.ones(MiB, device=dev)
check(float(z.sum()) == MiB, "allocation after set_per_process_memory_fraction(1.0) broken")
del z

settle(torch)
end = tt.stats()
note(f"hits {end['cache_hits']} misses {end['cache_misses']}, "
     f"peak reserved {end['reserved_bytes']['peak'] / MiB:.0f} MiB")
print("SMOKE OK")
