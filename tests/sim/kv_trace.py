"""Writes, without a GPU, the allocation trace of bench_frontier.py's kvcache workload (a tool).

    python3 tests/sim/kv_trace.py SEED OUT.trace [RUNS]

wl_kvcache draws its arrivals, prefills, decode lengths and early ends from random.Random(SEED)
alone (torch.randn's values do not matter): each sequence's cache is one tensor of 128 KiB per
token; every step each live sequence allocates a one-token row, torch.cat allocates the grown
cache, the old cache is dropped, then the row; sequences that end are dropped when the live list
is rebuilt (CPython frees a dropped list's items last to first). RUNS repeats the workload in one
process, as bench_time.py does (a warm-up and timed runs; the cache is kept). All on stream 0.

Replay: ./target/release/tessera-replay OUT.trace --frontier
"""

import random

import trace_cli

TOKEN_BYTES = 2 * 8 * 32 * 128 * 2  # (2, layers 8, heads 32, T, 128) bf16: 128 KiB per token


def trace(seed, runs=1, steps=300):
    lines, next_addr = [], [0x10000]

    def alloc(nbytes):
        next_addr[0] += 0x1000
        block = (next_addr[0], nbytes)
        lines.append("a %d %d 0" % block)
        return block

    def free(block):
        lines.append("f %d %d 0" % block)

    for _ in range(runs):
        rng = random.Random(seed)
        live = []  # [cache block, tokens still to decode]

        def arrive():
            prefill = rng.randint(16, 512)
            live.append([alloc(prefill * TOKEN_BYTES), rng.randint(16, 400)])

        for _ in range(16):
            arrive()
        for _ in range(steps):
            if len(live) < 40 and rng.random() < 0.3:
                arrive()
            survivors, ended = [], []
            for seq in live:
                row = alloc(TOKEN_BYTES)
                grown = alloc(seq[0][1] + TOKEN_BYTES)
                free(seq[0])
                seq[0] = grown
                free(row)
                seq[1] -= 1
                if seq[1] > 0 and rng.random() >= 1 / 200:
                    survivors.append(seq)
                else:
                    ended.append(seq)
            for seq in reversed(ended):
                free(seq[0])
            live = survivors
        for seq in reversed(live):  # the workload returns: its list goes
            free(seq[0])
    return lines


if __name__ == "__main__":
    trace_cli.main(__doc__, trace, 1)
