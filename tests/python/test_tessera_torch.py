"""Tests of the Python package (python/tessera, also importable as tessera_torch) and the C ABI of libtessera.so, no GPU needed.

They use the real library (TESSERA_LIB or target/release/libtessera.so) with the host
backend (real memory through mmap) or the sim backend. The config can be set only before
the first allocation, so every test that configures or allocates runs in a fresh Python
subprocess, which prints one `RESULT {json}` line that the test then checks.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "python"
sys.path.insert(0, str(EXAMPLE))

import tessera_torch  # noqa: E402  (must not import torch)

MiB = 1 << 20
# Names the tools (tessera_torch users, train_gpt.py, the GPU suite) rely on.
REQUIRED_GAUGES = {"allocated_bytes", "requested_bytes", "reserved_bytes", "active_blocks"}
REQUIRED_COUNTERS = {"cache_hits", "cache_misses", "ooms"}


@pytest.fixture(scope="session")
def lib_path():
    path = Path(os.environ.get("TESSERA_LIB") or REPO / "target" / "release" / "libtessera.so")
    if not path.is_file():
        pytest.fail(f"{path} not found: run `cargo build --release` first (or set TESSERA_LIB)")
    return str(path)


@pytest.fixture(scope="session")
def lib(lib_path):
    # In-process use is limited to calls that neither configure nor allocate.
    return tessera_torch.load(lib_path)


PRELUDE = """
import ctypes, json, random, sys, threading
import tessera_torch as tt
lib = tt.load()
MiB = 1 << 20
def emit(**kw):
    print("RESULT " + json.dumps(kw), flush=True)
"""


def run_child(lib_path, body, env=None):
    """Run PRELUDE + body in a fresh interpreter; return the dict it emitted."""
    full_env = {k: v for k, v in os.environ.items() if k != "TESSERA_CONF"}
    full_env.update(TESSERA_LIB=lib_path, PYTHONPATH=str(EXAMPLE), **(env or {}))
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
                          env=full_env, capture_output=True, text=True, timeout=120)
    results = [line[len("RESULT "):] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or len(results) != 1:
        pytest.fail(f"child failed (rc={proc.returncode})\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return json.loads(results[0])


# --- loading and metadata (in process: no configure, no allocation) ---

def test_import_does_not_import_torch(lib_path):
    r = run_child(lib_path, "emit(torch='torch' in sys.modules)")
    assert r["torch"] is False


def test_find_library_env(lib_path, monkeypatch, tmp_path):
    monkeypatch.setenv("TESSERA_LIB", lib_path)
    assert tessera_torch.find_library() == lib_path
    monkeypatch.setenv("TESSERA_LIB", str(tmp_path / "missing.so"))
    with pytest.raises(FileNotFoundError, match="missing.so"):
        tessera_torch.find_library()


def test_load_is_singleton_and_version(lib, lib_path):
    assert tessera_torch.load() is lib
    assert tessera_torch.load(lib_path) is lib
    v = tessera_torch.version()
    assert isinstance(v, str) and v.strip()


def test_gauge_and_counter_names(lib):
    ng, nc = lib.tessera_gauge_count(), lib.tessera_counter_count()
    assert ng > 0 and nc > 0
    gauges = [lib.tessera_gauge_name(i) for i in range(ng)]
    counters = [lib.tessera_counter_name(i) for i in range(nc)]
    for name in gauges + counters:
        assert name, f"empty or NULL name in {gauges + counters}"
    gauges, counters = [n.decode() for n in gauges], [n.decode() for n in counters]
    assert len(set(gauges)) == ng, gauges
    assert len(set(counters)) == nc, counters
    # stats() puts both kinds in one dict: a shared name would hide one of them.
    assert not set(gauges) & set(counters)
    assert REQUIRED_GAUGES <= set(gauges), f"missing gauges: {REQUIRED_GAUGES - set(gauges)}"
    assert REQUIRED_COUNTERS <= set(counters), f"missing counters: {REQUIRED_COUNTERS - set(counters)}"
    # Out of range: NULL.
    for fn, n in ((lib.tessera_gauge_name, ng), (lib.tessera_counter_name, nc)):
        assert fn(n) is None and fn(-1) is None


def test_last_error_empty_on_fresh_thread(lib_path):
    r = run_child(lib_path, "emit(err=tt.last_error())")
    assert r["err"] == ""


# --- configuration ---

def test_configure_bad_key(lib_path):
    r = run_child(lib_path, """
        rc = lib.tessera_configure(b"nonsense_key:1")
        msg = tt.last_error()
        try:
            tt.configure("nonsense_key:1")
            raised = ""
        except ValueError as e:
            raised = str(e)
        bad_value = lib.tessera_configure(b"backend:quantum")
        bad_value_msg = tt.last_error()
        bad_size = lib.tessera_configure(b"page_size:lots")
        ok = lib.tessera_configure(b"backend:host,page_size:64K")  # failures left no damage
        emit(rc=rc, msg=msg, raised=raised, bad_value=bad_value, bad_value_msg=bad_value_msg,
             bad_size=bad_size, ok=ok, check=lib.tessera_check_config())
    """)
    assert r["rc"] == -1
    assert "nonsense_key" in r["msg"], r["msg"]
    assert "nonsense_key" in r["raised"], r["raised"]
    assert r["bad_value"] == -1 and r["bad_value_msg"], r
    assert r["bad_size"] == -1, r
    assert r["ok"] == 0 and r["check"] == 0, r


def test_check_config_reads_env(lib_path):
    bad = run_child(lib_path, "emit(rc=lib.tessera_check_config(), msg=tt.last_error())",
                    env={"TESSERA_CONF": "nonsense_key:1"})
    assert bad["rc"] == -1 and "nonsense_key" in bad["msg"], bad
    good = run_child(lib_path, "emit(rc=lib.tessera_check_config())",
                     env={"TESSERA_CONF": "backend:host,page_size:64K"})
    assert good["rc"] == 0
    # configure() overrides the environment.
    over = run_child(lib_path, """
        tt.configure("backend:host")
        emit(rc=lib.tessera_check_config())
    """, env={"TESSERA_CONF": "nonsense_key:1"})
    assert over["rc"] == 0


def test_env_conf_selects_host_backend(lib_path):
    # With TESSERA_CONF alone (no configure call) the host backend hands out writable memory.
    r = run_child(lib_path, """
        p = lib.tessera_try_malloc(4096, 0, None)
        ok = bool(p)
        if ok:
            ctypes.memset(p, 0x5A, 4096)
            ok = ctypes.string_at(p, 4096) == b"\\x5a" * 4096
            lib.tessera_free(p, 4096, 0, None)
        emit(ok=ok, err=tt.last_error())
    """, env={"TESSERA_CONF": "backend:host,page_size:64K"})
    assert r["ok"], r


# --- allocation through the host backend ---

def test_host_malloc_stats_and_cache_hit(lib_path):
    r = run_child(lib_path, """
        tt.configure("backend:host,page_size:64K")
        n = 1 << 20
        p = lib.tessera_try_malloc(n, 0, None)
        if not p:
            emit(p=None, err=tt.last_error()); sys.exit(0)
        pattern = bytes(range(256)) * (n // 256)
        ctypes.memmove(p, pattern, n)
        roundtrip = ctypes.string_at(p, n) == pattern
        ctypes.memset(p, 0xA5, n)
        memset_ok = ctypes.string_at(p, n) == b"\\xa5" * n
        live = tt.stats(0)
        lib.tessera_free(p, n, 0, None)
        freed = tt.stats(0)
        q = lib.tessera_try_malloc(n, 0, None)
        again = tt.stats(0)
        lib.tessera_free(q, n, 0, None)
        tt.reset_peak_stats(0)
        reset = tt.stats(0)
        tt.empty_cache()
        emptied = tt.stats(0)
        bad_dev = lib.tessera_get_stats(-1, ctypes.byref(tt.TesseraStats()))
        emit(p=p, q=q, roundtrip=roundtrip, memset_ok=memset_ok, live=live, freed=freed,
             again=again, reset=reset, emptied=emptied, bad_dev=bad_dev, bad_dev_msg=tt.last_error())
    """)
    n = MiB
    assert r["p"], f"tessera_try_malloc returned NULL: {r.get('err')}"
    assert r["q"]
    assert r["roundtrip"] and r["memset_ok"]
    live, freed, again, reset, emptied = r["live"], r["freed"], r["again"], r["reset"], r["emptied"]
    assert live["allocated_bytes"]["current"] >= n
    assert live["requested_bytes"]["current"] == n
    assert live["reserved_bytes"]["current"] >= live["allocated_bytes"]["current"]
    assert live["active_blocks"]["current"] == 1
    assert live["cache_misses"] >= 1
    assert freed["allocated_bytes"]["current"] == 0
    assert freed["requested_bytes"]["current"] == 0
    assert freed["active_blocks"]["current"] == 0
    assert freed["allocated_bytes"]["peak"] >= n
    assert freed["allocated_bytes"]["allocated"] >= n
    assert freed["allocated_bytes"]["freed"] == freed["allocated_bytes"]["allocated"]
    # Same size again: served from the cache.
    assert again["cache_hits"] >= freed["cache_hits"] + 1
    assert again["cache_misses"] == freed["cache_misses"]
    assert again["allocated_bytes"]["current"] >= n
    assert reset["allocated_bytes"]["peak"] == reset["allocated_bytes"]["current"] == 0
    assert reset["cache_hits"] == again["cache_hits"], "reset_peak_stats must not reset counters"
    # Nothing live: empty_cache gives (nearly) everything back.
    assert emptied["reserved_bytes"]["current"] < max(reset["reserved_bytes"]["current"], 1)
    assert emptied["reserved_bytes"]["current"] <= MiB
    assert r["bad_dev"] == -1 and r["bad_dev_msg"], r


def test_host_many_blocks_no_overlap(lib_path):
    r = run_child(lib_path, """
        tt.configure("backend:host,page_size:64K")
        rng = random.Random(1)
        live, errors, step = {}, [], 0   # ptr -> (size, fill byte)
        def alloc():
            global step
            size = rng.choice([1, 7, 512, 513, 4096, 65535, 65536, 200000, 3 * MiB])
            p = lib.tessera_try_malloc(size, 0, None)
            if not p:
                errors.append(f"NULL for {size}: {tt.last_error()}"); return
            step += 1
            ctypes.memset(p, step % 251, size)
            live[p] = (size, step % 251)
        def check_and_free(p):
            size, b = live.pop(p)
            if ctypes.string_at(p, size) != bytes([b]) * size:
                errors.append(f"block {p:#x}+{size} corrupted")
            lib.tessera_free(p, size, 0, None)
        for _ in range(300):
            alloc()
        for p in rng.sample(sorted(live), len(live) // 2):
            check_and_free(p)
        for _ in range(300):
            alloc()
        spans = sorted((p, p + s) for p, (s, _) in live.items())
        overlaps = sum(1 for a, b in zip(spans, spans[1:]) if a[1] > b[0])
        peak_live = len(live)
        for p in list(live):
            check_and_free(p)
        s = tt.stats(0)
        emit(errors=errors[:5], overlaps=overlaps, peak_live=peak_live,
             allocated=s["allocated_bytes"]["current"], active=s["active_blocks"]["current"])
    """)
    assert r["errors"] == []
    assert r["overlaps"] == 0
    assert r["peak_live"] >= 400
    assert r["allocated"] == 0 and r["active"] == 0


def test_host_threads(lib_path):
    # ctypes drops the GIL around each call, so the allocator really runs concurrently.
    r = run_child(lib_path, """
        tt.configure("backend:host,page_size:64K")
        errors = []
        def worker(t):
            rng = random.Random(t)
            stream = t + 1          # an opaque stream id per thread
            mine = []
            for i in range(400):
                size = rng.choice([16, 512, 4000, 70000, 1 << 20])
                p = lib.tessera_try_malloc(size, 0, stream)
                if not p:
                    errors.append(f"NULL: {tt.last_error()}"); return
                fill = (t * 31 + i) % 256
                ctypes.memset(p, fill, size)
                mine.append((p, size, fill))
                if len(mine) > 4 or rng.random() < 0.5:
                    q, qs, qf = mine.pop(rng.randrange(len(mine)))
                    if ctypes.string_at(q, qs) != bytes([qf]) * qs:
                        errors.append(f"thread {t}: block {q:#x}+{qs} corrupted")
                    lib.tessera_free(q, qs, 0, stream)
            for q, qs, qf in mine:
                if ctypes.string_at(q, qs) != bytes([qf]) * qs:
                    errors.append(f"thread {t}: block {q:#x}+{qs} corrupted")
                lib.tessera_free(q, qs, 0, stream)
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for th in threads: th.start()
        for th in threads: th.join()
        s = tt.stats(0)
        emit(errors=errors[:5], allocated=s["allocated_bytes"]["current"],
             active=s["active_blocks"]["current"], hits=s["cache_hits"])
    """)
    assert r["errors"] == []
    assert r["allocated"] == 0 and r["active"] == 0
    assert r["hits"] > 0


def test_host_memory_limit(lib_path):
    r = run_child(lib_path, """
        tt.configure(f"backend:host,page_size:64K,memory_limit:{4 * MiB}")
        big = lib.tessera_try_malloc(8 * MiB, 0, None)
        big_err = tt.last_error()
        ooms_after_big = tt.stats(0)["ooms"]
        blocks = []
        while len(blocks) < 64:
            p = lib.tessera_try_malloc(MiB, 0, None)
            if not p:
                break
            blocks.append(p)
        filled = len(blocks)
        for p in blocks:
            lib.tessera_free(p, MiB, 0, None)
        after = lib.tessera_try_malloc(2 * MiB, 0, None)   # a failure did not poison anything
        if after:
            ctypes.memset(after, 1, 2 * MiB)
            lib.tessera_free(after, 2 * MiB, 0, None)
        emit(big=big, big_err=big_err, ooms=ooms_after_big, filled=filled, after=after,
             reserved_peak=tt.stats(0)["reserved_bytes"]["peak"])
    """)
    assert r["big"] is None, "8 MiB granted under a 4 MiB memory_limit"
    assert r["big_err"], "a failed tessera_try_malloc must set tessera_last_error"
    assert r["ooms"] >= 1
    assert 1 <= r["filled"] <= 4, r
    assert r["after"], "2 MiB must fit once everything is freed"
    assert r["reserved_peak"] <= 4 * MiB


def test_sim_backend(lib_path):
    r = run_child(lib_path, """
        tt.configure("backend:sim")
        p = lib.tessera_try_malloc(256 * MiB, 0, None)   # a fake address: never dereference it
        live = tt.stats(0)["allocated_bytes"]["current"]
        if p:
            lib.tessera_free(p, 256 * MiB, 0, None)
        emit(p=p, live=live, after=tt.stats(0)["allocated_bytes"]["current"], err=tt.last_error())
    """)
    assert r["p"], r["err"]
    assert r["live"] >= 256 * MiB
    assert r["after"] == 0


def test_a_pasted_pytorch_configuration_allocates_and_warns_per_key(lib_path):
    # A PYTORCH_CUDA_ALLOC_CONF pasted into TESSERA_CONF: PyTorch's keys that do not apply
    # are warnings (install() prints them), the rest configures tessera.
    conf = ("backend:host,page_size:64K,max_split_size_mb:128,roundup_power2_divisions:[256:1,512:2,>:4],"
            "expandable_segments:True,pinned_use_cuda_host_register:True,per_process_memory_fraction:0.5")
    r = run_child(lib_path, """
        p = lib.tessera_try_malloc(4096, 0, None)
        emit(ok=bool(p), error=tt.last_error(), warnings=tt.config_warnings())
    """, env={"TESSERA_CONF": conf})
    assert r["ok"], r["error"]
    assert len(r["warnings"]) == 3, r["warnings"]
    for key in ("max_split_size_mb", "roundup_power2_divisions", "pinned_use_cuda_host_register"):
        assert any(key in w and "does not apply" in w for w in r["warnings"]), key


# --- install() without a real torch: a stand-in torch records what tessera asks of it ---

FAKE_TORCH = """
import sys, types
calls = []
torch = types.ModuleType("torch"); torch.__version__ = VERSION
cuda = types.ModuleType("torch.cuda"); cuda.is_initialized = lambda: False
memory = types.ModuleType("torch.cuda.memory")
class Hooks:
    def __getattr__(self, name):
        return lambda ptr: calls.append((name, bool(ptr)))
class CUDAPluggableAllocator:
    def __init__(self, path, malloc, free):
        calls.append(("plug-in", malloc, free)); self.hooks = Hooks()
    def allocator(self):
        return self.hooks
memory.CUDAPluggableAllocator = CUDAPluggableAllocator
memory.change_current_allocator = lambda a: calls.append(("changed",))
graphs = types.ModuleType("torch.cuda.graphs")
class CUDAGraph:
    def capture_begin(self): pass
graphs.CUDAGraph = CUDAGraph
cuda.memory, cuda.graphs, torch.cuda = memory, graphs, cuda
utils = types.ModuleType("torch.utils"); ext = types.ModuleType("torch.utils.cpp_extension")
def load(**kw):
    calls.append(("compiled",)); raise RuntimeError("a compiler error\\nError building extension")
ext.load = load
ext._get_build_directory = lambda name, verbose: CACHE
utils.cpp_extension, torch.utils = ext, utils
sys.modules.update({"torch": torch, "torch.cuda": cuda, "torch.cuda.memory": memory,
                    "torch.cuda.graphs": graphs, "torch.utils": utils, "torch.utils.cpp_extension": ext})
"""


@pytest.mark.parametrize("version, tools, expect", [
    ("2.10.1+cu128", True, "needs PyTorch 2.11 or newer"),   # refused before compiling
    ("2.11.0+cu130", False, "no C++ compiler (c++) and no ninja on PATH"),
    ("2.12.0a0+git1234", True, "Error building extension"),  # tried, and the compile failed
])
def test_install_falls_back_to_the_plain_plug_in_in_one_line(lib_path, tmp_path, version, tools, expect):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if tools:  # stand-ins that shutil.which finds
        for tool in ("c++", "ninja"):
            (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
            (bin_dir / tool).chmod(0o755)
    body = f"VERSION, CACHE = {version!r}, {str(tmp_path / 'cache')!r}\n" + FAKE_TORCH + """
import io, contextlib
err = io.StringIO()
with contextlib.redirect_stderr(err):
    path = tt.install()
emit(path=path, again=tt.install(), err=err.getvalue(), calls=calls)
"""
    out = run_child(lib_path, body, env={"TESSERA_CONF": "backend:host", "PATH": str(bin_dir)})
    assert out["path"] == out["again"] == "plug-in"
    lines = out["err"].splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("tessera: installed as a plain plug-in") and expect in lines[0], lines[0]
    assert "torch.cuda.memory_stats()" in lines[0]
    compiled = ["compiled"] in out["calls"]
    assert compiled == (expect == "Error building extension"), out["calls"]
    assert ["plug-in", "tessera_malloc", "tessera_free"] in out["calls"] and ["changed"] in out["calls"]
    hooks = {c[0] for c in out["calls"] if len(c) == 2 and c[1] is True}
    assert hooks == {"set_reset_fn", "set_record_stream_fn", "set_init_fn", "set_memory_fraction_fn"}


def test_install_with_adaptor_false_says_nothing(lib_path, tmp_path):
    body = f"VERSION, CACHE = '2.11.0', {str(tmp_path)!r}\n" + FAKE_TORCH + """
import io, contextlib
err = io.StringIO()
with contextlib.redirect_stderr(err):
    path = tt.install(adaptor=False)
emit(path=path, err=err.getvalue(), calls=calls)
"""
    out = run_child(lib_path, body, env={"TESSERA_CONF": "backend:host"})
    assert out["path"] == "plug-in" and out["err"] == ""
    assert ["compiled"] not in out["calls"]


def test_torch_versions_parse():
    from tessera import _install
    assert _install._torch_version("2.11.0+cu130") == (2, 11)
    assert _install._torch_version("2.12.0a0+git1234") == (2, 12)
    assert _install._torch_version("2.1.0rc1") == (2, 1)
    assert _install._torch_version("nonsense") == (0, 0)
    assert _install._torch_version("2.10.1") < _install.MIN_TORCH <= _install._torch_version("2.11.0")


# --- tags: region, pause, resume (host backend: real memory) ---

def test_region_pause_resume_keeps_addresses_and_contents(lib_path):
    r = run_child(lib_path, """
        def alloc(n):
            p = lib.tessera_try_malloc(n, 0, None)
            assert p, tt.last_error()
            return p
        plain = alloc(MiB)
        ctypes.memset(plain, 0x11, MiB)
        with tt.region("weights"):
            inner = tt.current_tag()
            w = [alloc(3 * MiB) for _ in range(4)]
        after = tt.current_tag()
        for i, p in enumerate(w):
            ctypes.memset(p, 0x20 + i, 3 * MiB)
        reserved = tt.stats()["reserved_bytes"]["current"]
        given = tt.pause("weights", backup="cpu")
        s = tt.tag_stats("weights")
        paused = dict(given=given, reserved_drop=reserved - tt.stats()["reserved_bytes"]["current"],
                      paused=s["paused_bytes"]["current"], backup=s["backup_bytes"]["current"],
                      device_paused=tt.stats()["paused_bytes"]["current"])
        with tt.region("weights"):
            refused = lib.tessera_try_malloc(MiB, 0, None)
            refusal = tt.last_error()
        try:
            tt.pause("weights", backup="disk")
            bad_backup = ""
        except ValueError as e:
            bad_backup = str(e)
        mapped = tt.resume("weights")
        intact = all(ctypes.string_at(p, 3 * MiB) == bytes([0x20 + i]) * (3 * MiB) for i, p in enumerate(w))
        plain_ok = ctypes.string_at(plain, MiB) == b"\\x11" * MiB
        for p in w + [plain]:
            lib.tessera_free(p, 0, 0, None)
        emit(inner=inner, after=after, mapped=mapped, intact=intact, plain_ok=plain_ok,
             refused=bool(refused), refusal=refusal, bad_backup=bad_backup,
             after_resume=tt.tag_stats("weights")["paused_bytes"]["current"], **paused)
    """, env={"TESSERA_CONF": "backend:host,page_size:64K,max_handle_size:1M"})
    assert (r["inner"], r["after"]) == ("weights", ""), r
    assert r["given"] >= 12 * MiB and r["reserved_drop"] == r["given"] == r["paused"] == r["device_paused"], r
    assert r["backup"] == 12 * MiB, r
    assert not r["refused"] and "paused" in r["refusal"], r
    assert "backup" in r["bad_backup"], r
    assert r["mapped"] == r["given"] and r["intact"] and r["plain_ok"] and r["after_resume"] == 0, r


def test_resume_out_of_memory_raises_and_can_be_retried(lib_path):
    r = run_child(lib_path, """
        with tt.region("kv"):
            kv = lib.tessera_try_malloc(24 * MiB, 0, None)
        ctypes.memset(kv, 0x42, 24 * MiB)
        tt.pause("kv", backup="cpu")
        hog = lib.tessera_try_malloc(48 * MiB, 0, None)
        try:
            tt.resume("kv")
            caught = ""
        except tt.OutOfMemoryError as e:
            caught = str(e)
        still = tt.tag_stats("kv")["paused_bytes"]["current"]
        lib.tessera_free(hog, 0, 0, None)
        tt.resume("kv")
        intact = ctypes.string_at(kv, 24 * MiB) == b"\\x42" * (24 * MiB)
        emit(hog=bool(hog), caught=caught, still=still, intact=intact)
    """, env={"TESSERA_CONF": "backend:host,page_size:64K,device_capacity:64M"})
    assert r["hog"], r
    assert r["caught"].startswith("CUDA out of memory") and "resuming tag 'kv'" in r["caught"], r
    assert r["still"] >= 24 * MiB and r["intact"], r


def test_keep_backups_carries_host_copies_from_one_cycle_to_the_next(lib_path):
    r = run_child(lib_path, """
        with tt.region("engine"):
            w = [lib.tessera_try_malloc(2 * MiB, 0, None) for _ in range(3)]
        for i, p in enumerate(w):
            ctypes.memset(p, 0x30 + i, 2 * MiB)
        tt.pause("engine", backup="cpu")
        tt.resume("engine")
        kept = tt.tag_stats("engine")["backup_bytes"]["current"]
        for i, p in enumerate(w):
            ctypes.memset(p, 0x40 + i, 2 * MiB)
        tt.pause("engine", backup="cpu")
        tt.resume("engine")
        intact = all(ctypes.string_at(p, 2 * MiB) == bytes([0x40 + i]) * (2 * MiB) for i, p in enumerate(w))
        tt.pause("engine")
        dropped = tt.tag_stats("engine")["backup_bytes"]["current"]
        tt.resume("engine")
        for p in w:
            lib.tessera_free(p, 0, 0, None)
        emit(kept=kept, intact=intact, dropped=dropped)
    """, env={"TESSERA_CONF": "backend:host,page_size:64K,keep_backups:true"})
    assert r["kept"] == 6 * MiB, "the resume keeps its copies, and counts them"
    assert r["intact"], "the second pause copied the new contents into the kept copies"
    assert r["dropped"] == 0, "a pause without a backup lets them go"
