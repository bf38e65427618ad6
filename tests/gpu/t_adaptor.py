"""The torch adaptor: unchanged PyTorch code with tessera installed through it
(tessera_torch.install(adaptor=True)), against PyTorch's own allocator in the same run.

Two child processes run the same code: native (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True,
whose rounding and splitting tessera's matches) and tessera. Checked:
- torch.cuda.memory_stats(): the same keys; allocated_bytes and requested_bytes equal to
  native's after every training step; memory_summary() prints;
- memory history and _snapshot(): tessera's blocks and trace entries carry the Python stack
  frames PyTorch gathered, and PyTorch's memory viewer renders the dump;
- out of memory raises torch.cuda.OutOfMemoryError, and the process goes on;
- cudnn.benchmark ResNet-18 training steps (cacheInfo);
- a CUDA graph through torch.cuda.graph replays correctly, and its pool's memory goes back
  when the graph is deleted; a torch.cuda.MemPool serves and is released;
- torch.compile(mode="reduce-overhead") (cudagraph trees) equals eager over 100 calls with
  shapes changing;
- CUDA IPC is refused with tessera's message.
"""

import gc
import json
import os
import subprocess
import sys
import tempfile

from gpu_util import REPO, check, last_json, note

MiB = 1 << 20


def child(mode, out_dir):
    if mode == "tessera":
        import tessera_torch
        kind = tessera_torch.install(adaptor=True)
        check(kind == "adaptor", f"installed as {kind}")
    import torch
    res = {}

    # Statistics after every training step.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)).cuda()
    opt = torch.optim.AdamW(model.parameters())
    series = []
    for step in range(6):
        x = torch.randn(64 + 40 * step, 1024, device="cuda")
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del x
        torch.cuda.synchronize()
        s = torch.cuda.memory_stats()
        series.append([s["allocated_bytes.all.current"], s["requested_bytes.all.current"]])
    res["series"] = series
    res["keys"] = sorted(torch.cuda.memory_stats())
    res["summary"] = "Allocated memory" in torch.cuda.memory_summary()
    res["max_reserved"] = torch.cuda.max_memory_reserved()

    # A CUDA graph's pool, returned when the graph goes.
    static_x = torch.randn(2048, 2048, device="cuda")
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            static_x @ static_x
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = (static_x @ static_x).relu() + 1
    static_x.copy_(torch.randn(2048, 2048, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    res["graph_ok"] = bool(torch.allclose(static_y, (static_x @ static_x).relu() + 1, atol=1e-3, rtol=1e-3))
    during = torch.cuda.memory_reserved()
    del graph, static_y
    gc.collect()
    torch.cuda.empty_cache()
    res["graph_reserved"] = [before, during, torch.cuda.memory_reserved()]

    if mode == "native":
        return res

    # History and snapshot with stack frames, rendered by PyTorch's viewer.
    torch.cuda.memory._record_memory_history(max_entries=10000)
    kept = torch.empty(3 * MiB, device="cuda")
    snap = torch.cuda.memory._snapshot()
    res["block_frames"] = any(b.get("frames") for seg in snap["segments"] for b in seg["blocks"]
                              if b["state"] == "active_allocated" and b["address"] == kept.data_ptr())
    res["trace_frames"] = any(e.get("frames") for e in snap["device_traces"][0] if e["action"] == "alloc")
    dump = os.path.join(out_dir, "adaptor_snapshot.pickle")
    torch.cuda.memory._dump_snapshot(dump)
    torch.cuda.memory._record_memory_history(enabled=None)
    html = os.path.join(out_dir, "adaptor_trace.html")
    viz = subprocess.run([sys.executable, "-m", "torch.cuda._memory_viz", "trace_plot", dump, "-o", html],
                         capture_output=True, text=True, timeout=120)
    res["viz"] = viz.returncode == 0 and os.path.getsize(html) > 4000
    del kept

    # Out of memory is PyTorch's own error, and the process goes on.
    try:
        torch.empty(1 << 46, dtype=torch.uint8, device="cuda")
        res["oom"] = "not raised"
    except torch.cuda.OutOfMemoryError as e:
        res["oom"] = "OutOfMemoryError: " + str(e)[:60]
    except RuntimeError as e:
        res["oom"] = "RuntimeError: " + str(e)[:60]
    res["after_oom"] = torch.ones(1 << 20, device="cuda").sum().item()

    # cudnn.benchmark: cuDNN asks the allocator what it can hand out (cacheInfo).
    import torchvision
    torch.backends.cudnn.benchmark = True
    net = torchvision.models.resnet18().cuda()
    sgd = torch.optim.SGD(net.parameters(), lr=0.01)
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(net(torch.randn(16, 3, 224, 224, device="cuda")),
                                                 torch.randint(0, 1000, (16,), device="cuda"))
        loss.backward()
        sgd.step()
        sgd.zero_grad()
        losses.append(loss.item())
    res["cudnn"] = all(l == l for l in losses)
    del net, sgd
    torch.backends.cudnn.benchmark = False

    # A MemPool.
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool):
        inside = torch.empty(8 * MiB, device="cuda")
    res["mempool_segments"] = len(pool.snapshot())
    res["mempool_use_count"] = pool.use_count()
    del inside, pool
    gc.collect()

    # torch.compile(mode="reduce-overhead"): cudagraph trees over tessera's pools.
    small = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256)).cuda()
    compiled = torch.compile(small, mode="reduce-overhead")
    worst = 0.0
    with torch.no_grad():
        for i in range(100):
            x = torch.randn((8, 16, 32)[i % 3], 256, device="cuda")
            worst = max(worst, (compiled(x) - small(x)).abs().max().item())
    res["compile_max_diff"] = worst

    # CUDA IPC: refused, with tessera's reason.
    try:
        torch.ones(16, device="cuda").untyped_storage()._share_cuda_()
        res["ipc"] = "shared"
    except RuntimeError as e:
        res["ipc"] = str(e)[:80]
    return res


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3])), flush=True)
        return
    out_dir = os.environ.get("OUT") or tempfile.mkdtemp()
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "python"))
    results = {}
    for mode, extra in (("native", {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}), ("tessera", {})):
        proc = subprocess.run([sys.executable, __file__, "--child", mode, out_dir], env=dict(env, **extra),
                              capture_output=True, text=True, timeout=600)
        sys.stdout.write("\n".join(l for l in proc.stdout.splitlines() if not l.startswith("{")) + "\n")
        sys.stderr.write(proc.stderr[-6000:])
        results[mode] = last_json(proc.stdout)
        check(proc.returncode == 0 and results[mode] is not None, f"the {mode} child failed (rc {proc.returncode})")
    nat, tes = results["native"], results["tessera"]
    print(json.dumps({k: v for k, v in tes.items() if k != "keys"}))
    check(tes["keys"] == nat["keys"], f"memory_stats keys differ: {sorted(set(tes['keys']) ^ set(nat['keys']))}")
    check(tes["series"] == nat["series"], f"allocated/requested after each step: tessera {tes['series']} native {nat['series']}")
    check(tes["summary"], "memory_summary() printed no table")
    check(tes["block_frames"] and tes["trace_frames"], "no stack frames in the snapshot's blocks or trace")
    check(tes["viz"], "PyTorch's memory viewer did not render the dump")
    check(tes["oom"].startswith("OutOfMemoryError"), f"out of memory raised {tes['oom']}")
    check(tes["after_oom"] == float(1 << 20), "no computing after the OOM")
    check(tes["cudnn"], "cudnn.benchmark training gave no finite loss")
    before, during, after = tes["graph_reserved"]
    n_before, n_during, n_after = nat["graph_reserved"]
    check(tes["graph_ok"] and nat["graph_ok"], "the graph's replay is wrong")
    # What stays after the graph is deleted (cuBLAS's workspace, allocated in the capture's pool,
    # lives on in both): no more than native keeps, give or take a granule.
    check(during > before and after - before <= n_after - n_before + 2 * MiB,
          f"reserved before/with/after the graph: tessera {tes['graph_reserved']} native {nat['graph_reserved']}")
    check(tes["mempool_segments"] >= 1 and tes["mempool_use_count"] >= 1, f"MemPool: {tes['mempool_segments']} segments")
    check(tes["compile_max_diff"] < 1e-3, f"reduce-overhead differs from eager by {tes['compile_max_diff']}")
    check(tes["ipc"].startswith("tessera does not share"), f"IPC: {tes['ipc']}")
    note(f"{len(tes['keys'])} memory_stats keys = native's; 6 steps exact; frames in snapshot; "
         f"OutOfMemoryError; cudnn.benchmark; graph pool returned ({during - after >> 20} of {during - before >> 20} MiB, "
         f"native {n_during - n_after >> 20} of {n_during - n_before >> 20}); MemPool; "
         f"reduce-overhead max diff {tes['compile_max_diff']:.1e}; IPC refused")


if __name__ == "__main__":
    main()
