"""Producer/consumer across streams with record_stream, while allocations churn.

Each iteration: stream A allocates and fills a buffer with i; stream B waits for A,
sleeps a little (to widen the race window), then reads the buffer's min and max into
result slots; the buffer gets record_stream(B) and is dropped right away; then A at once
allocates same-size and random-size tensors and overwrites them with -1. If the allocator
handed the buffer's memory to A before B had read it, B would see -1.
"""

import random

from gpu_util import check, install, note, settle

ITERS = 1000
torch, tt = install()
base = tt.stats()
rng = random.Random(7)
A, B = torch.cuda.Stream(), torch.cuda.Stream()
res_min = torch.full((ITERS,), -2, dtype=torch.int32, device="cuda")
res_max = torch.full((ITERS,), -2, dtype=torch.int32, device="cuda")
B.wait_stream(torch.cuda.current_stream())  # result slots are ready before B writes them
churn = []

for i in range(ITERS):
    n = int(2 ** rng.uniform(8, 21))  # 256 .. 2M int32 (1 KiB .. 8 MiB)
    with torch.cuda.stream(A):
        buf = torch.empty(n, dtype=torch.int32, device="cuda")
        buf.fill_(i)
    B.wait_stream(A)
    with torch.cuda.stream(B):
        torch.cuda._sleep(rng.choice([1_000, 20_000, 200_000]))
        res_min[i] = buf.min()
        res_max[i] = buf.max()
    buf.record_stream(B)
    del buf
    with torch.cuda.stream(A):  # churn on the producer stream
        churn.append(torch.empty(n, dtype=torch.int32, device="cuda").fill_(-1))
        for _ in range(3):
            churn.append(torch.empty(int(2 ** rng.uniform(8, 21)), dtype=torch.int32, device="cuda").fill_(-1))
        while len(churn) > 12:
            churn.pop(rng.randrange(len(churn)))
    if i % 100 == 99:
        torch.cuda.synchronize()

torch.cuda.synchronize()
expect = torch.arange(ITERS, dtype=torch.int32, device="cuda")
bad = ((res_min != expect) | (res_max != expect)).nonzero().flatten().tolist()
for i in bad[:10]:
    print(f"iteration {i}: consumer saw min {int(res_min[i])} max {int(res_max[i])}, expected {i}")
del churn
settle(torch)
end = tt.stats()
check(not bad, f"{len(bad)} of {ITERS} iterations read a buffer that was reused too early")
check(end["active_blocks"]["current"] - base["active_blocks"]["current"] == 3,  # res_min, res_max, expect
      f"active_blocks {base['active_blocks']['current']} -> {end['active_blocks']['current']}")
note(f"{ITERS} iterations, no early reuse; hits {end['cache_hits']} misses {end['cache_misses']}")
print("MULTISTREAM OK")
