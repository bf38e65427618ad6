"""Writes, without a GPU, the allocation trace of bench_frontier.py's multistream workload (a tool).

    python3 tests/sim/multistream_trace.py SEED OUT.trace [SIZE_SCALE]

record_trace.wl_multistream(widen_pending=False) draws its sizes and lifetimes from
random.Random(SEED) alone, so its allocation sequence is known without running it: a producer
buffer (stream 1) and a consumer result of the same size (stream 2) per iteration, the buffer
freed at once (record_stream), results held 4-64 iterations, a quarter of them summed on the
default stream (a 512 B block, freed in batches of 33). Frees are written where the workload
drops the tensor (the device is taken to keep up). Seed 0 gives peak live 95,605,760 B, what
tessera and expandable_segments report on the GPU for bench_frontier's multistream.

Replay: ./target/release/tessera-replay OUT.trace --frontier
"""

import collections
import math
import random

import trace_cli

KiB, MiB = 1 << 10, 1 << 20


def log_uniform(rng, lo, hi):
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def trace(seed, size_scale=1, iters=2500):
    rng = random.Random(seed)
    lines, next_addr = [], [0x10000]

    def alloc(nbytes, stream):
        next_addr[0] += 0x1000
        block = (next_addr[0], trace_cli.rounded(nbytes), stream)
        lines.append("a %d %d %d" % block)
        return block

    def free(block):
        lines.append("f %d %d %d" % block)

    held, sums = collections.deque(), []
    for _ in range(iters):
        n = log_uniform(rng, 1 * KiB, 16 * MiB) // 4 * size_scale
        buf = alloc(4 * n, 1)
        held.append(alloc(4 * n, 2))
        free(buf)
        limit = rng.randint(4, 64)
        while len(held) > limit:
            old = held.popleft()
            if rng.random() < 0.25:
                sums.append(alloc(4, 0))
            free(old)
        if len(sums) > 32:
            for s in sums:
                free(s)
            sums.clear()
    for block in list(held) + sums:
        free(block)
    return lines


if __name__ == "__main__":
    trace_cli.main(__doc__, trace, 1)
