"""Memory shared across streams (a benchmark, not a test): a producer stream fills
buffers that a consumer stream reads; each buffer is freed by the producer side
after the consumer is done (with record_stream, or with wait_stream and no
record_stream). Reports peak reserved over peak live for tessera and the native
allocator, one process each. Target (issue 4): tessera <= 1.10.
    python3 tests/gpu/bench_multistream.py"""
import json
import sys

from gpu_util import MiB, note, run_json

STEPS = 400


def child(which, mode):
    if which == "tessera":
        import tessera_torch as tt
        tt.install()
    import torch
    prod, cons = torch.cuda.Stream(), torch.cuda.Stream()
    acc = torch.zeros(1, device="cuda")
    for i in range(STEPS):
        n = (8 + (i * 7) % 56) * MiB // 4
        with torch.cuda.stream(prod):
            buf = torch.full((n,), float(i % 3), device="cuda")
        cons.wait_stream(prod)
        with torch.cuda.stream(cons):
            acc += buf[:1024].sum()
            if mode == "record_stream":
                buf.record_stream(cons)
        if mode == "wait_stream":
            prod.wait_stream(cons)
        del buf
    torch.cuda.synchronize()
    if which == "tessera":
        s = tt.stats()
        live, reserved = s["allocated_bytes"]["peak"], s["reserved_bytes"]["peak"]
    else:
        live, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    print(json.dumps({"which": which, "mode": mode, "peak_live": live, "peak_reserved": reserved}))


if __name__ == "__main__":
    if len(sys.argv) > 2:
        child(sys.argv[1], sys.argv[2])
        sys.exit(0)
    rows = []
    for mode in ("record_stream", "wait_stream"):
        for which in ("native", "tessera"):
            r, _ = run_json([sys.executable, __file__, which, mode], timeout=120)
            rows.append(r)
            print(f"{mode:14} {which:8} peak live {r['peak_live'] / MiB:8.1f} MiB  reserved {r['peak_reserved'] / MiB:8.1f} MiB  "
                  f"ratio {r['peak_reserved'] / max(r['peak_live'], 1):.2f}")
    note("; ".join(f"{r['mode']} {r['which']} {r['peak_reserved'] / max(r['peak_live'], 1):.2f}" for r in rows))
