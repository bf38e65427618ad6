"""Writes, without a GPU, the allocation trace of bench_frontier.py's churn workload (a tool).

    python3 tests/sim/churn_trace.py SEED OUT.trace [OPS]

wl_churn draws its sizes and lifetimes from random.Random(SEED) alone: torch.empty of a
log-uniform size in 512 B .. 256 MiB, a lifetime log-uniform in 1 .. 1000 allocations, and
while the live set would pass 3 GiB, random live tensors are dropped first. All on the default
stream. Frees are written where the workload drops the tensor: expired ones when the live list
is rebuilt (CPython frees a dropped list's items last to first), evicted ones at once.

Replay: ./target/release/tessera-replay OUT.trace --frontier
"""

import math
import random

import trace_cli

MiB, GiB = 1 << 20, 1 << 30


def trace(seed, ops=3000):
    rng = random.Random(seed)
    lines, next_addr = [], [0x10000]
    bound = 3 * GiB
    live = []  # [expires_at, nbytes, (addr, rounded size)]
    total = 0
    lo, hi = math.log(512), math.log(256 * MiB)

    def free(item):
        lines.append("f %d %d 0" % item[2])

    for i in range(ops):
        expired = [item for item in live if item[0] <= i]
        total -= sum(item[1] for item in expired)
        live = [item for item in live if item[0] > i]
        for item in reversed(expired):
            free(item)
        size = int(math.exp(rng.uniform(lo, hi)))
        while live and total + size > bound:
            item = live.pop(rng.randrange(len(live)))
            total -= item[1]
            free(item)
        next_addr[0] += 0x1000
        block = (next_addr[0], trace_cli.rounded(size))
        lines.append("a %d %d 0" % block)
        live.append([i + int(math.exp(rng.uniform(0, math.log(1000)))), size, block])
        total += size
    for item in reversed(live):  # the workload returns: its list goes
        free(item)
    return lines


if __name__ == "__main__":
    trace_cli.main(__doc__, trace, 3000)
