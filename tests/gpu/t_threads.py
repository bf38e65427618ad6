"""8 threads, each on its own stream, allocate/fill/verify/free random-size tensors
(run by the suite twice: as configured, and with TESSERA_CONF=driver_thread:true, where the
driver thread must have made driver calls among them).

Every tensor is filled with a value unique to (thread, iteration) and checked just before
it is freed, so a block handed out twice while live shows up as a wrong value. Some
tensors are freed by another thread than the one that allocated them (PyTorch calls free
from whatever thread drops the last reference).
(Freeing from a thread whose current device differs needs 2 GPUs: not tested here.)
"""

import os
import queue
import random
import threading
import time

from gpu_util import check, install, note, settle

THREADS, ITERS = 8, 2000
torch, tt = install()
base = tt.stats()
errors = []
handoff = queue.Queue()  # tensors verified and synchronised by one thread, dropped by another


def worker(tid):
    rng = random.Random(tid)
    stream = torch.cuda.Stream()
    live = []
    try:
        with torch.cuda.stream(stream):
            for i in range(ITERS):
                n = int(2 ** rng.uniform(0, 22))  # 1 .. 4M floats (16 MiB), log-uniform
                v = float(tid * 10_000 + i)       # exact in float32
                live.append((torch.full((n,), v, device="cuda"), v))
                if len(live) > 6 or rng.random() < 0.6:
                    t, v = live.pop(rng.randrange(len(live)))
                    if not bool(t.eq(v).all()):
                        errors.append(f"thread {tid} iter {i}: tensor of {t.numel()} floats lost value {v}")
                    if rng.random() < 0.1:
                        stream.synchronize()  # no pending work: safe for any thread to drop it
                        handoff.put(t)
                    del t
                try:  # drop someone else's tensor now and then
                    handoff.get_nowait()
                except queue.Empty:
                    pass
            for t, v in live:
                if not bool(t.eq(v).all()):
                    errors.append(f"thread {tid} final: tensor of {t.numel()} floats lost value {v}")
            live.clear()
            stream.synchronize()
    except Exception as e:  # noqa: BLE001  (reported below)
        errors.append(f"thread {tid}: {type(e).__name__}: {e}")


t0 = time.perf_counter()
threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
for th in threads:
    th.start()
for th in threads:
    th.join()
elapsed = time.perf_counter() - t0
while not handoff.empty():
    handoff.get()
settle(torch)

for e in errors[:20]:
    print("ERROR", e)
end = tt.stats()
print(f"{THREADS} threads x {ITERS} iterations in {elapsed:.1f} s; hits {end['cache_hits']} "
      f"misses {end['cache_misses']} peak reserved {end['reserved_bytes']['peak'] >> 20} MiB")
check(not errors, f"{len(errors)} errors")
for g in ("allocated_bytes", "active_blocks"):
    check(end[g]["current"] == base[g]["current"],
          f"{g} not back to start: {base[g]['current']} -> {end[g]['current']}")
threaded = "driver_thread:true" in os.environ.get("TESSERA_CONF", "")
if threaded:
    check(end["background_driver_calls"] > base["background_driver_calls"], "the driver thread made no driver call")
    extra = (f"; driver thread: {end['background_driver_calls']} calls, {end['ready_hits']} ready hits; "
             f"caller threads: {end['driver_calls']} calls")
else:
    extra = ""
note(f"{THREADS}x{ITERS} in {elapsed:.1f}s, no corruption{extra}")
print("THREADS OK")
