"""Writes, without a GPU, the allocation trace of bench_time.py's manystream workload (a tool).

    python3 tests/sim/manystream_trace.py SEED OUT.trace [RUNS]

64 streams in turn: allocation i is random.Random(SEED).randint(1, 16) MiB on stream 1 + i % 64,
freed at once on the same stream; 1,500 allocations a run, RUNS runs (default 5) in one trace,
as bench_time.py keeps the cache between runs. Each miss finds only blocks that other streams
freed a moment ago.

    ./target/release/tessera-replay OUT.trace --conf backend:sim
"""

import random

import trace_cli

STREAMS, PER_RUN = 64, 1500


def trace(seed, runs=5):
    rng = random.Random(seed)
    lines = []
    for _ in range(runs):
        for i in range(PER_RUN):
            n = rng.randint(1, 16) << 20
            lines += ["a 4096 %d %d" % (n, 1 + i % STREAMS), "f 4096 %d %d" % (n, 1 + i % STREAMS)]
    return lines


if __name__ == "__main__":
    trace_cli.main(__doc__, trace, 5)
