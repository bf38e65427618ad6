"""Writes 200,000 allocate/free pairs over STREAMS distinct streams, for the replay scaling
table (a tool).

    python3 tests/sim/streams_trace.py SEED OUT.trace [STREAMS]

Pair i runs on stream 1 + i % STREAMS: 64 KiB - 1 MiB (log-uniform, random.Random(SEED)),
freed at once, with 256 blocks of the same sizes live throughout on stream 0. With STREAMS 1
and 100,000 the events are the same but for their streams, so that their ns/event compare
what a stream costs.

    ./target/release/tessera-replay OUT.trace --conf backend:sim
"""

import math
import random

import trace_cli

PAIRS = 200_000


def trace(seed, n_streams=100_000):
    rng = random.Random(seed)
    lo, hi = math.log(64 << 10), math.log(1 << 20)
    lines, addr = [], 0x10000
    resident = []
    for _ in range(256):
        addr += 0x1000
        resident.append((addr, trace_cli.rounded(int(math.exp(rng.uniform(lo, hi))))))
        lines.append("a %d %d 0" % resident[-1])
    for i in range(PAIRS):
        addr += 0x1000
        block = (addr, trace_cli.rounded(int(math.exp(rng.uniform(lo, hi)))), 1 + i % n_streams)
        lines.append("a %d %d %d" % block)
        lines.append("f %d %d %d" % block)
    lines += ["f %d %d 0" % b for b in resident]
    return lines


if __name__ == "__main__":
    trace_cli.main(__doc__, trace, 100_000)
