"""Tests of tessera_torch's observability: memory_stats / memory_summary in PyTorch's shape,
snapshot(), the history trace, on_oom callbacks, monitor() and `python -m tessera_torch`.

No GPU, no torch: the host backend in fresh subprocesses (see test_tessera_torch.run_child).
"""

import json
import os
import subprocess
import sys

from test_tessera_torch import EXAMPLE, MiB, REPO, lib_path, run_child  # noqa: F401  (lib_path: fixture)


HOST = "backend:host,page_size:64K"
FIELDS = ("current", "peak", "allocated", "freed")
POOLS = ("all", "small_pool", "large_pool")
# The keys of torch.cuda.memory_stats() with the native allocator (PyTorch 2.11, read on an H200).
TORCH_ARRAYS = ("active", "active_bytes", "allocated_bytes", "allocation", "inactive_split",
                "inactive_split_bytes", "requested_bytes", "reserved_bytes", "segment")
TORCH_KEYS = (
    [f"{a}.{p}.{f}" for a in TORCH_ARRAYS for p in POOLS for f in FIELDS]
    + [f"{o}.{f}" for o in ("oversize_allocations", "oversize_segments") for f in FIELDS]
    + ["max_split_size", "num_alloc_retries", "num_device_alloc", "num_device_free", "num_ooms",
       "num_sync_all_streams"]
)
SUMMARY_ROWS = ("Allocated memory", "Active memory", "Requested memory", "GPU reserved memory",
                "Non-releasable memory", "Allocations", "Active allocs", "GPU reserved segments",
                "Non-releasable allocs", "Oversize allocations", "Oversize GPU segments")


def stat(current, peak, allocated, freed):
    return dict(zip(FIELDS, (current, peak, allocated, freed)))


def test_memory_stats_torch_keys_and_exact_values(lib_path):
    r = run_child(lib_path, f"""
        tt.configure("{HOST}")
        a = lib.tessera_try_malloc(1000, 0, None)       # small pool: 1024-byte block
        b = lib.tessera_try_malloc(3 * MiB, 0, None)    # large pool
        c = lib.tessera_try_malloc(5000, 0, None)       # small pool: 5120-byte block
        lib.tessera_free(c, 5000, 0, None)
        s = tt.memory_stats()
        raw = tt.stats()
        segments = [g for g in tt.snapshot()["segments"] if g["device"] == 0]
        same_by_string = tt.memory_stats("cuda:0") == s
        simple = [tt.memory_allocated(), tt.max_memory_allocated(), tt.memory_reserved(),
                  tt.max_memory_reserved()]
        tt.reset_peak_memory_stats()
        after_reset = tt.memory_stats(0)
        emit(keys=list(s), s=s, raw=raw, n_segments=len(segments), same_by_string=same_by_string,
             simple=simple, after_reset=after_reset, ints=all(type(v) is int for v in s.values()))
    """)
    s, raw = r["s"], r["raw"]
    torch_keys = [k for k in r["keys"] if not k.startswith("tessera.")]
    assert set(torch_keys) == set(TORCH_KEYS), sorted(set(torch_keys) ^ set(TORCH_KEYS))
    assert len(TORCH_KEYS) == 122  # PyTorch 2.11's count
    assert r["keys"] == sorted(r["keys"]), "memory_stats() is sorted, as torch's"
    assert r["ints"]

    def get(prefix):
        return {f: s[f"{prefix}.{f}"] for f in FIELDS}

    big, small1, small2 = 3 * MiB, 1024, 5120
    expect = {
        "allocated_bytes.all": stat(big + small1, big + small1 + small2, big + small1 + small2, small2),
        "allocated_bytes.small_pool": stat(small1, small1 + small2, small1 + small2, small2),
        "allocated_bytes.large_pool": stat(big, big, big, 0),
        "requested_bytes.all": stat(big + 1000, big + 6000, big + 6000, 5000),
        "requested_bytes.small_pool": stat(1000, 6000, 6000, 5000),
        "requested_bytes.large_pool": stat(big, big, big, 0),
        "allocation.all": stat(2, 3, 3, 1),
        "allocation.small_pool": stat(1, 2, 2, 1),
        "allocation.large_pool": stat(1, 1, 1, 0),
    }
    for prefix, want in expect.items():
        assert get(prefix) == want, prefix
    for pool in POOLS:
        # Nothing waits for another stream: active is allocated.
        assert get(f"active_bytes.{pool}") == get(f"allocated_bytes.{pool}")
        assert get(f"active.{pool}") == get(f"allocation.{pool}")
    for pool in ("small_pool", "large_pool"):
        # Mapped bytes of an arena = allocated + cached (free, mapped).
        assert (s[f"reserved_bytes.{pool}.current"]
                == s[f"allocated_bytes.{pool}.current"] + s[f"inactive_split_bytes.{pool}.current"])
        assert s[f"segment.{pool}.current"] == 1
    # The small pool's free blocks: the freed 5120-byte block waits whole in its stream's front
    # cache (reading statistics gives nothing back), beside the rest of the page. The large
    # pool has none: the small pool's partly used page is over max_cached_fraction of what is
    # held and no handle of it can be recycled, so the 3 MiB growth mapped exactly 3 MiB (not
    # growth_size).
    # (A read that drained the fronts would show 1 on the second read, same_by_string below.)
    assert s["inactive_split.small_pool.current"] == 2
    assert s["inactive_split.large_pool.current"] == 0
    assert s["inactive_split_bytes.large_pool.current"] == 0
    assert get("reserved_bytes.all") == raw["reserved_bytes"]
    assert get("inactive_split_bytes.all") == raw["cached_bytes"]
    assert s["segment.all.current"] == r["n_segments"] == 2
    assert s["num_device_alloc"] == raw["driver_create_calls"] > 0
    assert s["num_device_free"] == raw["driver_release_calls"]
    assert s["num_ooms"] == s["num_alloc_retries"] == 0
    assert s["max_split_size"] == -1
    for key in ("num_sync_all_streams", "oversize_allocations.current", "oversize_segments.peak"):
        assert s[key] == 0
    # tessera's own keys: every gauge and counter, and the derived ones.
    for gauge, value in raw.items():
        if isinstance(value, dict):
            assert get(f"tessera.{gauge}") == value
        else:
            assert s[f"tessera.{gauge}"] == value
    # The largest cached block is the small pool's tail, past the block in the front cache.
    assert s["tessera.largest_free_block"] == s["inactive_split_bytes.small_pool.current"] - 5120 > 0
    assert s["tessera.reserved_unallocated_bytes"] == raw["reserved_bytes"]["current"] - (big + small1)
    assert s["tessera.pending_free_bytes"] == 0
    assert r["same_by_string"]
    assert r["simple"] == [big + small1, big + small1 + small2,
                           raw["reserved_bytes"]["current"], raw["reserved_bytes"]["peak"]]
    after = r["after_reset"]
    assert after["allocated_bytes.all.peak"] == after["allocated_bytes.all.current"] == big + small1
    assert after["allocated_bytes.all.allocated"] == big + small1 + small2  # totals survive a reset


def test_memory_summary_layout(lib_path):
    r = run_child(lib_path, f"""
        tt.configure("{HOST}")
        p = lib.tessera_try_malloc(3 * MiB, 0, None)
        emit(full=tt.memory_summary(), short=tt.memory_summary(abbreviated=True),
             stats=tt.memory_stats())
    """)
    full, short = r["full"], r["short"]
    for text in (full, short):
        lines = text.splitlines()
        assert all(len(line) == 77 and line[0] == line[-1] == "|" for line in lines), lines
        assert "memory summary, device ID 0" in lines[1]
        assert "CUDA OOMs: 0" in text and "cudaMalloc retries: 0" in text
        assert "| Metric" in text.replace("        Metric", "| Metric") and "Cur Usage" in text
        for row in SUMMARY_ROWS:
            assert f"| {row}" in text, row
    assert "from large pool" in full and "from small pool" in full
    assert "from large pool" not in short
    row = next(line for line in full.splitlines() if line.startswith("| Allocated memory"))
    assert row.split("|")[2].split() == ["3072", "KiB"], row  # PyTorch's unit choice
    assert "physical handles" in full


def test_snapshot_block_and_trace(lib_path, tmp_path):
    pickle_path = tmp_path / "snap.pickle"
    r = run_child(lib_path, f"""
        import pickle
        tt.configure("{HOST}")
        tt.record_memory_history(True, max_entries=1000)
        p = lib.tessera_try_malloc(2 * MiB + 100, 0, None)
        q = lib.tessera_try_malloc(4000, 0, None)
        lib.tessera_free(q, 4000, 0, None)
        snap = tt.snapshot()
        dumped = tt.dump_snapshot({str(pickle_path)!r})
        with open({str(pickle_path)!r}, "rb") as f:
            loaded = pickle.load(f)
        seg = [g for g in snap["segments"] if any(b["address"] == p for b in g["blocks"])]
        block = [b for g in seg for b in g["blocks"] if b["address"] == p]
        emit(p=p, q=q, keys=sorted(snap), seg=seg, block=block, settings=snap["allocator_settings"],
             pool_ids=[type(g["segment_pool_id"]).__name__ for g in snap["segments"]],
             trace=snap["device_traces"][0], round_trip=loaded == snap,
             n_devices=len(snap["device_traces"]))
    """)
    assert r["keys"] == ["allocator_settings", "device_traces", "external_annotations", "segments"]
    assert r["settings"]["TESSERA_CONF"] == HOST
    assert set(r["pool_ids"]) == {"tuple"}
    assert len(r["seg"]) == 1 and len(r["block"]) == 1
    seg, block = r["seg"][0], r["block"][0]
    assert block["state"] == "active_allocated"
    assert block["size"] == 2 * MiB + 512 and block["requested_size"] == 2 * MiB + 100
    assert seg["segment_type"] == "large" and seg["device"] == 0
    assert seg["address"] <= r["p"] < seg["address"] + seg["total_size"]
    assert seg["total_size"] == sum(b["size"] for b in seg["blocks"])
    assert seg["allocated_size"] == block["size"]
    # Blocks tile the segment in address order (what _memory_viz assumes).
    addr = seg["address"]
    for b in seg["blocks"]:
        assert b["address"] == addr
        addr += b["size"]
    actions = [(e["action"], e["addr"]) for e in r["trace"]]
    assert ("alloc", r["p"]) in actions and ("alloc", r["q"]) in actions
    i = actions.index(("free_requested", r["q"]))
    assert actions[i + 1] == ("free_completed", r["q"]), "the viewer counts free_completed as the free"
    assert any(a == "segment_map" for a, _ in actions)
    assert r["round_trip"] and r["n_devices"] == 1


def test_history_trace_parses_and_counts(lib_path, tmp_path):
    path = tmp_path / "hist.trace"
    r = run_child(lib_path, f"""
        tt.configure("{HOST}")
        tt.record_memory_history(True)
        rng = random.Random(7)
        live, n_alloc, n_free = [], 0, 0
        for i in range(300):
            if live and rng.random() < 0.45:
                p, n = live.pop(rng.randrange(len(live)))
                lib.tessera_free(p, n, 0, None); n_free += 1
            else:
                n = rng.choice([1, 700, 4096, 100000, 3 * MiB])
                live.append((lib.tessera_try_malloc(n, 0, None), n)); n_alloc += 1
        text = tt.history_trace()
        written = tt.dump_history_trace({str(path)!r})
        events = tt.snapshot()["device_traces"][0]
        tt.record_memory_history(False)
        emit(text=text, n_alloc=n_alloc, n_free=n_free, written=written,
             snap_alloc=sum(e["action"] == "alloc" for e in events),
             snap_free=sum(e["action"] == "free_requested" for e in events),
             after_stop=tt.history_trace())
    """)
    lines = [line for line in r["text"].splitlines() if line.strip()]
    assert lines[0].startswith("#")
    parsed = []
    for line in lines[1:]:
        action, addr, size, stream = line.split()
        assert action in ("a", "f")
        parsed.append((action, int(addr), int(size), int(stream)))
    assert sum(a == "a" for a, *_ in parsed) == r["n_alloc"] == r["snap_alloc"]
    assert sum(a == "f" for a, *_ in parsed) == r["n_free"] == r["snap_free"]
    assert r["written"] == len(parsed)
    assert all(size % 512 == 0 and size > 0 for _, _, size, _ in parsed), "sizes are block sizes"
    live = set()
    for action, addr, _, _ in parsed:  # every free frees a live address
        if action == "a":
            assert addr not in live
            live.add(addr)
        else:
            live.remove(addr)
    assert path.read_text() == r["text"]
    assert [line for line in r["after_stop"].splitlines() if not line.startswith("#")] == []
    replay = REPO / "target" / "release" / "tessera-replay"
    if replay.is_file():
        out = subprocess.run([str(replay), str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout.strip().splitlines()[-1])
        assert isinstance(report, dict) and report, out.stdout


def test_on_oom_callback_frees_and_retry_succeeds(lib_path):
    r = run_child(lib_path, f"""
        tt.configure("{HOST},memory_limit:{4 * MiB}")
        hold = [lib.tessera_try_malloc(3 * MiB, 0, None)]
        calls = []
        @tt.on_oom
        def free_hold(device, size):
            calls.append((device, size))
            if hold:
                lib.tessera_free(hold.pop(), 3 * MiB, 0, None)
        p = lib.tessera_try_malloc(2 * MiB, 0, None)   # fits only once the callback freed hold
        ok = bool(p)
        if ok:
            ctypes.memset(p, 7, 2 * MiB)
        s = tt.stats()
        def broken(device, size):
            raise ValueError("broken callback")
        tt.on_oom(broken)
        q = lib.tessera_try_malloc(64 * MiB, 0, None)   # hopeless: every callback runs, then OOM
        emit(ok=ok, first_calls=calls[:1], ooms_first=s["ooms"], q=q, err=tt.last_error(),
             calls=calls, ooms=tt.stats()["ooms"])
    """)
    assert r["ok"], "the retry after the callback must succeed"
    assert r["first_calls"] == [[0, 2 * MiB]]
    assert r["ooms_first"] == 0, "a request that succeeded on the retry is no OOM"
    assert r["q"] is None and "out of memory" in r["err"].lower()
    assert r["calls"][-1] == [0, 64 * MiB]
    assert r["ooms"] == 1


def test_on_oom_exception_is_printed_not_raised(lib_path):
    proc = subprocess.run(
        [sys.executable, "-c", f"""
import tessera_torch as tt
tt.configure("{HOST},memory_limit:{MiB}")
lib = tt.load()
def broken(device, size):
    raise ValueError("broken callback")
tt.on_oom(broken)
q = lib.tessera_try_malloc({8 * MiB}, 0, None)
p = lib.tessera_try_malloc(4096, 0, None)
print("after", q, bool(p))
"""], env=dict(os.environ, TESSERA_LIB=lib_path, PYTHONPATH=str(EXAMPLE)),
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "after None True" in proc.stdout
    assert "exception in OOM callback" in proc.stderr and "ValueError: broken callback" in proc.stderr


def test_monitor_prints_and_stops(lib_path):
    r = run_child(lib_path, f"""
        import io, time
        tt.configure("{HOST}")
        p = lib.tessera_try_malloc(3 * MiB, 0, None)
        buf = io.StringIO()
        stop = tt.monitor(0.05, file=buf)
        time.sleep(0.4)
        stop()
        n = len(buf.getvalue().splitlines())
        time.sleep(0.2)
        emit(text=buf.getvalue(), n_after_stop=len(buf.getvalue().splitlines()), n=n,
             threads=[t.name for t in threading.enumerate()])
    """)
    lines = r["text"].splitlines()
    assert len(lines) >= 2, r["text"]
    for word in ("allocated 3.00 MiB", "reserved", "fragmentation", "ooms 0"):
        assert word in lines[0], lines[0]
    assert r["n_after_stop"] == r["n"], "stop() must end the thread"
    assert "tessera-monitor" not in r["threads"]


def test_python_m_prints_usage_and_options(lib_path):
    env = dict(os.environ, TESSERA_LIB=lib_path, PYTHONPATH=str(EXAMPLE))
    for args in ([], ["--status"]):
        proc = subprocess.run([sys.executable, "-m", "tessera_torch", *args], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        for word in ("memory_stats", "snapshot", "on_oom", "monitor", "TESSERA_CONF"):
            assert word in proc.stdout
        for name, default, _ in tessera_torch_options(lib_path):
            assert f"\n  {name} " in proc.stdout and default in proc.stdout, name
    assert "cannot attach to another process" in proc.stdout


def tessera_torch_options(lib_path):
    return [tuple(o) for o in run_child(lib_path, "emit(opts=tt.options())")["opts"]]


def test_options_table_matches_library(lib_path):
    # The library names every accepted key when it rejects an unknown one (no allocation, no damage).
    r = run_child(lib_path, """
        rc = lib.tessera_configure(b"tessera_no_such_key:1")
        emit(rc=rc, msg=tt.last_error(), names=[o[0] for o in tt.options()])
    """)
    assert r["rc"] == -1
    assert "accepted keys:" in r["msg"], r["msg"]
    library = {k.strip() for k in r["msg"].split("accepted keys:", 1)[1].split(",")}
    assert set(r["names"]) == library, (set(r["names"]) ^ library)


def test_stats_dont_import_torch(lib_path):
    r = run_child(lib_path, f"""
        tt.configure("{HOST}")
        p = lib.tessera_try_malloc(4096, 0, None)
        tt.memory_stats(); tt.memory_summary(); tt.snapshot(); tt.status_line()
        emit(torch="torch" in sys.modules)
    """)
    assert r["torch"] is False
