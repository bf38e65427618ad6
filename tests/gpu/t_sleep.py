"""Sleep and wake, an RL-style loop in one process (through the torch adaptor): an engine (a
model's weights tagged "weights", paused with a CPU backup; a KV cache tagged "kv", paused
without; a CUDA graph of the engine's step captured inside the "weights" region) serves a
batch; both tags pause; a trainer allocates more than was free before the pause (it would run
out of memory without it) and computes; both tags resume; the engine's outputs and the graph's
replay equal those before the pause, bit for bit. Ten cycles: reserved memory, the driver's free
memory and the process's host memory come back to where they were. Then a resume under
pressure: the trainer keeps its memory, the resume raises torch.cuda.OutOfMemoryError naming the
tag, the tag stays paused with its backup, and once the trainer frees, the resume succeeds with
the contents intact. Prints pause and resume times per GiB, with and without backup (cycles 1-9:
the trainer's cached memory given back with torch.cuda.empty_cache() before the resumes; cycle 0
leaves it cached, so that the resume itself gives the untagged cache back). The suite's
sleep_keep row runs it again with keep_backups:true (a pause copies into the host copies the
last resume kept). Last, a resume after most of a tag was freed while paused maps only what the
held blocks need, and a kernel that touches paused memory fails with an illegal-address error
(its own process)."""

import os
import statistics
import subprocess
import sys
import time

from gpu_util import check, install, note

GiB = 1 << 30
torch, tt = install()
check(tt.install() == "adaptor", "installed through the adaptor")
torch.manual_seed(0)
dev = torch.device("cuda")


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


with tt.region("weights"):
    layers = [torch.nn.Linear(8192, 8192, bias=False).to(dev) for _ in range(24)]  # 6 GiB of fp32
    static_in = torch.randn(256, 8192, device=dev)
with tt.region("kv"):
    kv = torch.empty(24 * GiB // 4, device=dev)  # 24 GiB, refilled before every use


def engine(x):
    kv[: x.numel()].copy_(x.flatten())  # the step reads its cache
    for layer in layers:
        x = torch.tanh(layer(x + kv[: x.numel()].view_as(x) * 1e-3))
    return x


with torch.no_grad():
    reference = engine(static_in).clone()
    # A graph of the step, its memory in the "weights" region.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        engine(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with tt.region("weights"), torch.cuda.graph(graph):
        graph_out = engine(static_in)
    graph.replay()
    torch.cuda.synchronize()
    graph_reference = graph_out.clone()
check(torch.equal(graph_reference, reference), "the graph's output differs from eager before any pause")

weights_bytes = tt.tag_stats("weights")["allocated_bytes"]["current"]
kv_bytes = tt.tag_stats("kv")["allocated_bytes"]["current"]
times = {"pause_backup": [], "pause": [], "resume_backup": [], "resume": []}
marks = []
for cycle in range(10):
    torch.cuda.synchronize()
    free_before, total = torch.cuda.mem_get_info()
    t0 = time.perf_counter()
    given_w = tt.pause("weights", backup="cpu")
    t1 = time.perf_counter()
    given_kv = tt.pause("kv")
    t2 = time.perf_counter()
    timed_cycle = cycle > 0  # cycle 0 resumes through the OOM path: the trainer's cache goes back first
    if timed_cycle:
        times["pause_backup"].append((t1 - t0) / (given_w / GiB))
        times["pause"].append((t2 - t1) / (given_kv / GiB))
    free_paused, _ = torch.cuda.mem_get_info()
    check(free_paused - free_before >= 0.95 * (given_w + given_kv),
          f"cycle {cycle}: the driver shows {(free_paused - free_before) / GiB:.1f} GiB more free, "
          f"not the {(given_w + given_kv) / GiB:.1f} GiB paused")
    # The trainer: more than was free before the pause.
    want = free_before + (given_w + given_kv) // 2
    big = torch.empty(want // 2, dtype=torch.float16, device=dev)
    big.normal_()
    a = big[: 8192 * 8192].view(8192, 8192)
    (a @ a).sum().item()
    del big, a
    if timed_cycle:
        torch.cuda.empty_cache()  # as an RL loop hands the trainer's memory back
    t3 = time.perf_counter()
    mapped_kv = tt.resume("kv")  # the untagged cache goes back to the driver to make room
    t4 = time.perf_counter()
    mapped_w = tt.resume("weights")
    t5 = time.perf_counter()
    if timed_cycle:
        times["resume"].append((t4 - t3) / (mapped_kv / GiB))
        times["resume_backup"].append((t5 - t4) / (mapped_w / GiB))
    # A resume maps what the held blocks need: all of it here, up to granules under cached blocks.
    check(weights_bytes <= mapped_w <= given_w and kv_bytes <= mapped_kv <= given_kv,
          f"cycle {cycle}: resumed {mapped_w}+{mapped_kv}, paused {given_w}+{given_kv}, held {weights_bytes}+{kv_bytes}")
    with torch.no_grad():
        out = engine(static_in)
        graph.replay()
    torch.cuda.synchronize()
    check(torch.equal(out, reference), f"cycle {cycle}: the engine's output changed across pause and resume")
    check(torch.equal(graph_out, graph_reference), f"cycle {cycle}: the graph's replay changed across pause and resume")
    s = tt.stats()
    marks.append((s["reserved_bytes"]["current"], torch.cuda.mem_get_info()[0], rss_bytes()))
    print(f"cycle {cycle}: paused {given_w / GiB:.2f}+{given_kv / GiB:.2f} GiB, trainer {want / GiB:.1f} GiB, "
          f"reserved {marks[-1][0] / GiB:.2f} GiB, rss {marks[-1][2] / GiB:.2f} GiB", flush=True)

first, last = marks[1], marks[-1]  # cycle 0 warms the trainer's kernels and pinned pools
check(abs(last[0] - first[0]) <= 64 << 20, f"reserved memory moved {(last[0] - first[0]) / 2**20:.0f} MiB over the cycles")
check(abs(last[1] - first[1]) <= 256 << 20, f"the driver's free memory moved {(last[1] - first[1]) / 2**20:.0f} MiB")
check(last[2] - first[2] <= 256 << 20, f"host memory grew {(last[2] - first[2]) / 2**20:.0f} MiB over the cycles")

# A resume that cannot get its memory: caught, the tag stays paused, a later resume succeeds.
tt.pause("weights", backup="cpu")
tt.pause("kv")
free_now, _ = torch.cuda.mem_get_info()
hog = torch.empty(free_now - GiB, dtype=torch.uint8, device=dev)
try:
    tt.resume("weights")
    check(False, "the resume succeeded with the memory taken")
except torch.cuda.OutOfMemoryError as e:
    message = str(e)
check("resuming tag 'weights'" in message, f"the error does not name the tag: {message[:300]}")
ws = tt.tag_stats("weights")
check(ws["paused_bytes"]["current"] > 0 and ws["backup_bytes"]["current"] >= weights_bytes,
      f"after the failed resume: paused {ws['paused_bytes']['current']}, backup {ws['backup_bytes']['current']}")
del hog
tt.resume("weights")
tt.resume("kv")
with torch.no_grad():
    out = engine(static_in)
    graph.replay()
torch.cuda.synchronize()
check(torch.equal(out, reference) and torch.equal(graph_out, graph_reference), "contents lost after the failed resume")

# Blocks freed while paused need nothing at resume: it maps only what the held blocks need.
with tt.region("scratch"):
    held = torch.full((64 << 20,), 7, dtype=torch.uint8, device=dev)  # 64 MiB
    dropped = torch.empty(4 * GiB, dtype=torch.uint8, device=dev)
paused_scratch = tt.pause("scratch")
del dropped
free_paused, _ = torch.cuda.mem_get_info()
mapped_scratch = tt.resume("scratch")
free_resumed, _ = torch.cuda.mem_get_info()
held.fill_(9)
check(mapped_scratch <= 256 << 20 and int(held.sum().item()) == 9 * (64 << 20),
      f"paused {paused_scratch} B, freed 4 GiB while paused, resumed {mapped_scratch} B")
check(free_paused - free_resumed <= 512 << 20, f"the resume took {(free_paused - free_resumed) / 2**20:.0f} MiB from the driver")
del held

# A kernel touching paused memory fails loudly: nothing is mapped there (its own process, as
# the fault ends the CUDA context).
probe = subprocess.run([sys.executable, "-c", """
import tessera_torch as tt
tt.install()
import torch
with tt.region("probe"):
    x = torch.ones(1 << 26, device="cuda")
tt.pause("probe")
print("sum", x.sum().item(), flush=True)
"""], capture_output=True, text=True, timeout=120)
check(probe.returncode != 0 and "illegal memory access" in probe.stderr and "sum" not in probe.stdout,
      f"touching paused memory: rc {probe.returncode}, stdout {probe.stdout[-200:]!r}, stderr {probe.stderr[-400:]!r}")

med = {k: statistics.median(v) for k, v in times.items()}
spread = {k: (min(v), max(v)) for k, v in times.items()}
conf = os.environ.get("TESSERA_CONF", "")
note(f"{conf + ': ' if conf else ''}10 cycles of {weights_bytes / GiB:.1f} GiB weights (backup) + {kv_bytes / GiB:.0f} GiB KV: outputs and graph "
     f"bit-identical, reserved moved {(last[0] - first[0]) / 2**20:.0f} MiB, rss {(last[2] - first[2]) / 2**20:.0f} MiB; "
     f"s/GiB median (range): pause+backup {med['pause_backup']:.3f} ({spread['pause_backup'][0]:.3f}-{spread['pause_backup'][1]:.3f}), "
     f"pause {med['pause']:.4f} ({spread['pause'][0]:.4f}-{spread['pause'][1]:.4f}), "
     f"resume+restore {med['resume_backup']:.3f} ({spread['resume_backup'][0]:.3f}-{spread['resume_backup'][1]:.3f}), "
     f"resume {med['resume']:.4f} ({spread['resume'][0]:.4f}-{spread['resume'][1]:.4f}); OOM resume caught and retried; "
     f"4 GiB freed while paused: resume mapped {mapped_scratch / 2**20:.0f} MiB; a kernel on paused memory: illegal address")
print("SLEEP OK")
