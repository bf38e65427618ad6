"""Writes a fragmenting trace of LIVE blocks, for the replay scaling table (a tool).

    python3 tests/sim/fragment_trace.py SEED OUT.trace [LIVE]

LIVE blocks of 1-3 MiB (uniform, random.Random(SEED)) are allocated, then every other one
freed, leaving LIVE/2 cached fragments no whole handle lies under. Then LIVE events of churn:
a free of a random live block or an allocation of 1-3 MiB, half each, every 64th allocation
4 MiB (larger than any fragment: it grows the pool, after recycling is tried). All on the
default stream; the blocks are freed at the end. Peak live is about LIVE x 2 MiB, so replay it
on a device that large:

    ./target/release/tessera-replay OUT.trace --conf backend:sim,device_capacity:4096T
"""

import random

import trace_cli

MiB = 1 << 20


def trace(seed, n_live=10_000):
    rng = random.Random(seed)
    lines, live, next_addr = [], [], 0x10000

    def alloc(size):
        nonlocal next_addr
        next_addr += 0x1000
        block = (next_addr, trace_cli.rounded(size))
        lines.append("a %d %d 0" % block)
        live.append(block)

    def free(i):
        live[i], live[-1] = live[-1], live[i]
        lines.append("f %d %d 0" % live.pop())

    for _ in range(n_live):
        alloc(rng.randint(MiB, 3 * MiB))
    kept = []
    for i, block in enumerate(live):  # every other one freed: fragments between live blocks
        if i % 2:
            lines.append("f %d %d 0" % block)
        else:
            kept.append(block)
    live[:] = kept
    allocs = 0
    for _ in range(n_live):
        if live and rng.random() < 0.5:
            free(rng.randrange(len(live)))
        else:
            allocs += 1
            alloc(4 * MiB if allocs % 64 == 0 else rng.randint(MiB, 3 * MiB))
    while live:
        free(len(live) - 1)
    return lines


if __name__ == "__main__":
    trace_cli.main(__doc__, trace, 10_000)
