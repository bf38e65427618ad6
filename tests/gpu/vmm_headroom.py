"""How much device memory the CUDA driver needs beside the granules tessera maps (a probe, not a test).

    python3 tests/gpu/vmm_headroom.py [--free-mib 24]

A cuMemAlloc ballast leaves --free-mib MiB free; then 2 MiB granules are created (cuMemCreate),
mapped (cuMemMap) and made accessible (cuMemSetAccess) one at a time until a call fails, in four
layouts: created only; mapped side by side; mapped 1 GiB apart; mapped 2 MiB apart in two
reservations 256 GiB apart (tessera's small and large arenas). Prints, per layout, how many granules
fit, which call failed, and the free bytes the driver reported before it; after the first layout,
how much more cuMemAlloc (what the ballast and PyTorch's native allocator use) still takes.
Everything is given back between layouts.
"""

import argparse
import ctypes as c
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_frontier import Driver  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
G = 2 * MiB


class Prop(c.Structure):
    _fields_ = [("type", c.c_int), ("handle_types", c.c_int), ("loc_type", c.c_int), ("loc_id", c.c_int),
                ("win32", c.c_void_p), ("compression", c.c_ubyte), ("rdma", c.c_ubyte), ("usage", c.c_ushort),
                ("reserved", c.c_ubyte * 4)]


class Access(c.Structure):
    _fields_ = [("loc_type", c.c_int), ("loc_id", c.c_int), ("flags", c.c_int)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--free-mib", type=int, default=24)
    args = ap.parse_args()
    drv = Driver()
    lib = drv.lib
    sigs = {
        "cuMemAddressReserve": [c.POINTER(c.c_uint64), c.c_size_t, c.c_size_t, c.c_uint64, c.c_ulonglong],
        "cuMemAddressFree": [c.c_uint64, c.c_size_t],
        "cuMemCreate": [c.POINTER(c.c_uint64), c.c_size_t, c.POINTER(Prop), c.c_ulonglong],
        "cuMemRelease": [c.c_uint64],
        "cuMemMap": [c.c_uint64, c.c_size_t, c.c_size_t, c.c_uint64, c.c_ulonglong],
        "cuMemUnmap": [c.c_uint64, c.c_size_t],
        "cuMemSetAccess": [c.c_uint64, c.c_size_t, c.POINTER(Access), c.c_size_t],
    }
    for name, argtypes in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, c.c_int
    prop = Prop(type=1, handle_types=0, loc_type=1, loc_id=0)
    access = Access(loc_type=1, loc_id=0, flags=3)
    drv._push()
    va_size = 1 << 40
    base = c.c_uint64()
    drv._check(lib.cuMemAddressReserve(c.byref(base), va_size, 0, 0, 0), "cuMemAddressReserve")
    layouts = {
        "created only": None,
        "side by side": lambda i: base.value + i * G,
        "1 GiB apart": lambda i: base.value + i * GiB,
        "two arenas": lambda i: base.value + (i % 2) * (va_size // 4) + (i // 2) * G,
    }
    print(f"ballast leaves {args.free_mib} MiB free")
    for name, where in layouts.items():
        drv.take_ballast(args.free_mib * MiB)
        free0 = drv.mem_info()[0]
        handles, mapped, failed, free_before = [], [], "", 0
        for i in range(10_000):
            free_before = drv.mem_info()[0]
            h = c.c_uint64()
            rc = lib.cuMemCreate(c.byref(h), G, c.byref(prop), 0)
            if rc:
                failed = f"cuMemCreate {drv._name(rc)}"
                break
            handles.append(h.value)
            if where is None:
                continue
            va = where(i)
            rc = lib.cuMemMap(va, G, 0, h.value, 0)
            if rc:
                failed = f"cuMemMap {drv._name(rc)}"
                break
            mapped.append(va)
            rc = lib.cuMemSetAccess(va, G, c.byref(access), 1)
            if rc:
                failed = f"cuMemSetAccess {drv._name(rc)}"
                break
        print(f"{name:14s}: free at start {free0 / MiB:8.3f} MiB, {len(handles)} created, {len(mapped)} mapped; "
              f"then {failed} with {free_before / MiB:.3f} MiB free", flush=True)
        if where is None:
            # What cuMemAlloc still takes there, in pieces down to 64 KiB.
            extra, piece = 0, G
            while piece >= 64 << 10:
                if drv._alloc(piece):
                    extra += piece
                else:
                    piece //= 2
            print(f"{'':14s}  then cuMemAlloc took {extra / MiB:.3f} MiB more, leaving {drv.mem_info()[0] / MiB:.3f} MiB free",
                  flush=True)
        for va in mapped:
            drv._check(lib.cuMemUnmap(va, G), "cuMemUnmap")
        for h in handles:
            drv._check(lib.cuMemRelease(h), "cuMemRelease")
        drv._pop()
        drv.drop_ballast()
        drv._push()
    drv._check(lib.cuMemAddressFree(base.value, va_size), "cuMemAddressFree")
    drv._pop()


if __name__ == "__main__":
    main()
