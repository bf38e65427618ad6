"""Out of memory: a clean RuntimeError("CUDA out of memory. Tried to allocate ..."), and the
process goes on working afterwards (the CUDA context is not poisoned).

Two child processes (the config is per process):
  limit:  memory_limit of 2 GiB, filled with 256 MiB tensors;
  device: no limit, the whole GPU filled with 4 GiB tensors (the driver's own OOM path).
"""

import subprocess
import sys

from gpu_util import MiB, check, install, note, settle

PREFIX = "CUDA out of memory. Tried to allocate"
GiB = 1 << 30


def expect_oom(torch, nbytes, what):
    try:
        t = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    except RuntimeError as e:
        msg = str(e)
        print(f"{what}: RuntimeError: {msg.splitlines()[0][:300]}")
        check(msg.startswith(PREFIX), f"{what}: message does not start with {PREFIX!r}: {msg[:300]!r}")
        return msg
    del t
    raise AssertionError(f"{what}: {nbytes} bytes granted, expected out of memory")


def fill(torch, chunk, max_chunks):
    """Allocate chunk-byte tensors until out of memory; return them and the error message."""
    held = []
    while len(held) < max_chunks:
        try:
            held.append(torch.empty(chunk, dtype=torch.uint8, device="cuda"))
            held[-1].fill_(len(held) % 256)  # touch it
        except RuntimeError as e:
            check(str(e).startswith(PREFIX), f"OOM message does not start with {PREFIX!r}: {str(e)[:300]!r}")
            return held, str(e)
    raise AssertionError(f"{len(held)} x {chunk / MiB:.0f} MiB granted, no OOM")


def still_works(torch, tag):
    a = torch.ones(2048, 2048, device="cuda")
    c = a @ a
    check(bool(c.eq(2048.0).all()), f"{tag}: matmul after OOM gave wrong values")
    torch.cuda.synchronize()


def child(mode):
    if mode == "limit":
        torch, tt = install(conf=f"memory_limit:{2 * GiB}")
        chunk, max_chunks = 256 * MiB, 64
    else:
        torch, tt = install()
        chunk, max_chunks = 4 * GiB, 256
    # As in a real job, the GPU has computed before it runs out (cuBLAS's
    # handle, made at the first matmul, takes driver memory of its own).
    still_works(torch, mode + " before")
    ooms0 = tt.stats()["ooms"]
    held, msg = fill(torch, chunk, max_chunks)
    n = len(held)
    print(f"{mode}: {n} x {chunk / MiB:.0f} MiB before OOM; message: {msg.splitlines()[0][:300]}")
    if mode == "limit":
        check(5 <= n <= 8, f"{n} x 256 MiB granted under a 2 GiB limit")
        check(tt.stats()["reserved_bytes"]["peak"] <= 2 * GiB, "reserved_bytes peak above memory_limit")
    held.pop()  # room for the small temporaries of the checks below
    for i, t in enumerate(held):  # what was granted is intact (ends of each tensor)
        for part in (t[:MiB], t[-MiB:]):
            check(bool(part.eq((i + 1) % 256).all()), f"tensor {i} corrupted after the OOM")
    # Free, then keep half of it and compute.
    del held
    settle(torch)
    half = [torch.full((chunk,), 3, dtype=torch.uint8, device="cuda") for _ in range(n // 2)]
    still_works(torch, mode)
    check(all(bool(t.eq(3).all()) for t in half), "half-size refill corrupted")
    del half
    settle(torch)
    # One hopeless request: 1 TiB.
    expect_oom(torch, 1 << 40, f"{mode} 1 TiB")
    still_works(torch, mode + " after 1 TiB")
    ooms = tt.stats()["ooms"] - ooms0
    check(ooms >= 2, f"ooms counter grew by {ooms}, expected >= 2")
    print(f"{mode}: OK ({n} chunks, ooms +{ooms})")
    return n


if __name__ == "__main__":
    if len(sys.argv) > 1:
        child(sys.argv[1])
        sys.exit(0)
    failed = []
    for mode in ("limit", "device"):
        proc = subprocess.run([sys.executable, __file__, mode], timeout=110)
        if proc.returncode != 0:
            failed.append(mode)
    note(f"failed: {', '.join(failed)}" if failed else "limit and device OOM both clean")
    sys.exit(1 if failed else 0)
