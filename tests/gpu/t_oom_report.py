"""OOM reports, printed in full: what a user sees when tessera runs out of memory.

One process, tessera with memory_limit:2G and an oom_snapshot file:
  too large  one request larger than the whole GPU;
  full       memory filled with 64 MiB tensors, every other one freed, then a request for
             more than all that is free.
Each message is printed whole between `=== OOM too-large ===` / `=== OOM full ===` and
`=== end ===`; each must start with PyTorch's "CUDA out of memory. Tried to allocate" and
give a "Next step". Also checked: the on_oom callback ran for each, the snapshot file was
written and loads, and the GPU computes afterwards.
"""

import json
import os
import tempfile

from gpu_util import MiB, check, install, note, settle

PREFIX = "CUDA out of memory. Tried to allocate"
GiB = 1 << 30
snap_path = os.path.join(tempfile.mkdtemp(prefix="tessera_oom_"), "oom_snapshot.json")
torch, tt = install(conf=f"memory_limit:2G,oom_snapshot:{snap_path}")
calls = []
tt.on_oom(lambda device, size: calls.append((device, size)))


def compute(tag):
    a = torch.ones(1024, 1024, device="cuda")
    check(bool((a @ a).eq(1024.0).all()), f"{tag}: matmul gave wrong values")
    torch.cuda.synchronize()


def oom(nbytes, title):
    try:
        t = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    except RuntimeError as e:
        msg = str(e)
    else:
        del t
        raise AssertionError(f"{title}: {nbytes} bytes granted, expected out of memory")
    print(f"=== OOM {title} ===\n{msg}\n=== end ===", flush=True)
    check(msg.startswith(PREFIX), f"{title}: does not start with {PREFIX!r}")
    check("Next step" in msg, f"{title}: no 'Next step' in the message")
    return msg


compute("before")
total = torch.cuda.get_device_properties(0).total_memory

# (a) One request larger than the GPU.
too_large = oom(2 * total, "too-large")

# (b) Full and fragmented: fill, free every other tensor, ask for more than is free.
held = []
while len(held) < 64:
    try:
        held.append(torch.empty(64 * MiB, dtype=torch.uint8, device="cuda"))
    except RuntimeError as e:
        check(str(e).startswith(PREFIX), f"fill: {str(e)[:200]}")
        break
check(16 <= len(held) < 64, f"{len(held)} x 64 MiB granted under a 2 GiB limit")
del held[::2]
settle(torch)
allocated = tt.memory_allocated()
free = 2 * GiB - allocated
print(f"filled {2 * len(held)} x 64 MiB (roughly), kept {len(held)}: allocated {allocated / MiB:.0f} MiB, "
      f"{free / MiB:.0f} MiB free under the limit")
full = oom(free + 256 * MiB, "full")
del held
settle(torch)
compute("after")

s = tt.stats()
check(s["ooms"] >= 3, f"ooms counter {s['ooms']} after three OOMs")
check(len(calls) >= 3 and calls[0] == (0, 2 * total), f"on_oom calls: {calls[:4]}")
check(os.path.isfile(snap_path), f"no OOM snapshot at {snap_path}")
with open(snap_path) as f:
    snap = json.load(f)
check("segments" in snap and "device_traces" in snap, "the OOM snapshot is not in torch's shape")
print(f"OOM snapshot: {os.path.getsize(snap_path)} bytes, {len(snap['segments'])} segments")


def next_step(msg):
    return msg[msg.index("Next step"):].split(".")[0][:70]


note(f"too-large -> '{next_step(too_large)}'; full -> '{next_step(full)}'")
print("OOM REPORT OK")
