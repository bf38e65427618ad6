"""tessera for PyTorch: load libtessera.so, install it as PyTorch's CUDA allocator, read its stats.

    import tessera
    tessera.install(adaptor=True)          # before any CUDA use: PyTorch's own APIs then work
    print(torch.cuda.memory_summary())

install(adaptor=True) builds the torch adaptor (PyTorch's CUDAAllocator over tessera, compiled
against this torch on first use; `python -m tessera build` does it ahead of time). With the
plain plug-in (install()), torch.cuda.memory_stats, memory_allocated, max_memory_reserved,
memory_summary and memory._snapshot raise; this module gives them back either way, with the
same names, signatures and shapes:

    memory_stats(device)            the keys of torch.cuda.memory_stats(), plus "tessera.*" keys
    memory_allocated / max_memory_allocated / memory_reserved / max_memory_reserved
    reset_peak_memory_stats(device)
    memory_summary(device, abbreviated)   torch.cuda.memory_summary()'s table
    snapshot() / dump_snapshot(path)      torch.cuda.memory._snapshot() / _dump_snapshot():
                                          python -m torch.cuda._memory_viz trace_plot snap.pickle -o out.html
    record_memory_history(enabled, max_entries), history_trace(device), dump_history_trace(path, device)
                                          (the trace replays with target/release/tessera-replay FILE)
    on_oom(fn)                      fn(device, size) runs before tessera gives up on a request; it retries once
    monitor(interval_s)             a daemon thread printing one status line per interval; returns stop()
    stats(device)                   tessera's own gauges and counters, by tessera's names

Importing this module does not import torch; only install() does. The library is
looked up in $TESSERA_LIB, then in this package (pip install), then in the repository's
target/release. `python -m tessera` prints this text and the configuration options;
`tessera_torch` is the same module under its former name.
"""

import collections
import ctypes
import json
import os
import pickle
import sys
import threading
import traceback

__all__ = [
    "release_graph_memory",
    "find_library", "load", "install", "stats", "reset_peak_stats",
    "empty_cache", "version", "configure", "check_config", "config_warnings", "last_error",
    "memory_stats", "memory_allocated", "max_memory_allocated", "memory_reserved",
    "max_memory_reserved", "reset_peak_memory_stats", "memory_summary",
    "snapshot", "dump_snapshot", "record_memory_history", "history_trace", "dump_history_trace",
    "on_oom", "monitor", "status_line", "options", "build_adaptor",
]

_LIB_NAME = "libtessera.so"
_HERE = os.path.dirname(os.path.abspath(__file__))

_lock = threading.Lock()
_lib = None          # the singleton CDLL
_lib_path = None     # the path it was loaded from
_allocator = None    # the CUDAPluggableAllocator that install() swapped in
_conf = None         # the string given to configure(), if any

# void (*)(int device, uint64_t size, void* user_data): see on_oom().
_OOM_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_uint64, ctypes.c_void_p)
_oom_callbacks = []  # (fn, CFUNCTYPE object): the library keeps the pointers forever, so do we


class TesseraStat(ctypes.Structure):
    """One gauge: current and peak value, cumulative increments and decrements."""
    _fields_ = [("current", ctypes.c_int64), ("peak", ctypes.c_int64),
                ("allocated", ctypes.c_int64), ("freed", ctypes.c_int64)]


# TesseraStats has TESSERA_GAUGE_COUNT gauges and TESSERA_COUNTER_COUNT counters;
# the counts come from the library at load time, see _stats_type().
TesseraStats = None


def find_library():
    """Path of libtessera.so: $TESSERA_LIB, the one this package bundles, or the repository's
    target/release."""
    env = os.environ.get("TESSERA_LIB")
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError(f"TESSERA_LIB={env} does not exist")
        return env
    bundled = sorted(f for f in os.listdir(_HERE) if f.startswith("libtessera") and f.endswith(".so"))
    candidates = [os.path.join(_HERE, f) for f in bundled] + [
        os.path.join(_HERE, os.pardir, os.pardir, "target", "release", _LIB_NAME),
    ]
    for path in candidates:
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise FileNotFoundError(
        f"{_LIB_NAME} not found (looked in $TESSERA_LIB, {', '.join(map(os.path.abspath, candidates))}); "
        "run `cargo build --release` in the repository or set TESSERA_LIB")


def _stats_type(n_gauges, n_counters):
    class _TesseraStats(ctypes.Structure):
        _fields_ = [("gauges", TesseraStat * n_gauges),
                    ("counters", ctypes.c_uint64 * n_counters)]
    _TesseraStats.__name__ = "TesseraStats"
    return _TesseraStats


def _declare(lib):
    """Set argtypes/restype of every exported function."""
    global TesseraStats
    c_int, c_i32, vp, sz = ctypes.c_int, ctypes.c_int32, ctypes.c_void_p, ctypes.c_ssize_t
    sigs = {
        "tessera_gauge_count": (c_i32, []),
        "tessera_counter_count": (c_i32, []),
        "tessera_gauge_name": (ctypes.c_char_p, [c_i32]),
        "tessera_counter_name": (ctypes.c_char_p, [c_i32]),
        "tessera_reset_peak_stats": (c_i32, [c_i32]),
        # tessera_malloc throws a C++ exception on failure: for PyTorch only, never call it
        # through ctypes. Use tessera_try_malloc (NULL + tessera_last_error) instead.
        "tessera_malloc": (vp, [sz, c_int, vp]),
        "tessera_try_malloc": (vp, [sz, c_int, vp]),
        "tessera_free": (None, [vp, sz, c_int, vp]),
        "tessera_empty_cache": (None, []),
        "tessera_record_stream": (None, [vp, vp]),
        "tessera_init": (None, [c_int]),
        "tessera_set_memory_fraction": (None, [ctypes.c_double, c_int]),
        "tessera_configure": (c_i32, [ctypes.c_char_p]),
        "tessera_check_config": (c_i32, []),
        "tessera_last_error": (ctypes.c_char_p, []),
        "tessera_version": (ctypes.c_char_p, []),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)  # AttributeError names the missing symbol
        fn.restype, fn.argtypes = restype, argtypes
    TesseraStats = _stats_type(lib.tessera_gauge_count(), lib.tessera_counter_count())
    i64, usize = ctypes.c_int64, ctypes.c_size_t
    more = {
        "tessera_get_stats": (c_i32, [c_i32, ctypes.POINTER(TesseraStats)]),
        "tessera_get_arena_stats": (c_i32, [c_int, c_int, ctypes.POINTER(TesseraStats)]),
        "tessera_snapshot_json": (i64, [vp, usize]),
        "tessera_record_history": (c_i32, [c_int, usize]),
        "tessera_history_trace": (i64, [c_int, vp, usize]),
        "tessera_register_oom_callback": (c_i32, [_OOM_CALLBACK, vp]),
        "tessera_release_graph_pools": (i64, []),
        "tessera_watch_graphs": (c_i32, []),
        "tessera_options_json": (i64, [vp, usize]),
        "tessera_cache_info": (c_i32, [c_int, ctypes.POINTER(ctypes.c_uint64)]),
        "tessera_status_line": (i64, [c_int, vp, usize]),
        "tessera_config_warnings": (i64, [vp, usize]),
    }
    for name, (restype, argtypes) in more.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


def load(lib_path=None):
    """Load libtessera.so once (PyTorch's own dlopen of the same path gets this same instance)."""
    global _lib, _lib_path
    with _lock:
        if _lib is None:
            path = os.path.abspath(lib_path or find_library())
            lib = ctypes.CDLL(path)
            _declare(lib)
            _lib, _lib_path = lib, path
        elif lib_path and os.path.abspath(lib_path) != _lib_path:
            raise RuntimeError(f"tessera already loaded from {_lib_path}, not {lib_path}")
        return _lib


def last_error():
    """This thread's last tessera error message ("" if none)."""
    return (load().tessera_last_error() or b"").decode(errors="replace")


def version():
    return load().tessera_version().decode()


def configure(conf):
    """Set the config ("key:value,key:value", TESSERA_CONF syntax); only before the first allocation."""
    global _conf
    if load().tessera_configure(conf.encode()) != 0:
        raise ValueError(f"tessera_configure({conf!r}) failed: {last_error()}")
    _conf = conf


def check_config():
    """Validate the active config ($TESSERA_CONF or configure()); raises ValueError if invalid."""
    if load().tessera_check_config() != 0:
        raise ValueError(f"invalid tessera config: {last_error()}")


def _fn_ptr(lib, name):
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value


def config_warnings():
    """The warnings of the configuration in force: PyTorch's keys (from a pasted
    PYTORCH_CUDA_ALLOC_CONF) that tessera accepted but that do not apply, each with why."""
    text = _read_text(load().tessera_config_warnings)
    return text.splitlines() if text else []


# What only the torch adaptor gives, for the plain plug-in's one line.
_PLAIN_LACKS = ("torch.cuda.memory_stats() and what is built on it, memory snapshots and history, "
                "torch.cuda.OutOfMemoryError, cudnn.benchmark, torch.compile(mode='reduce-overhead'), "
                "MemPool (tessera.memory_stats() and its peers work)")


def _adaptor_sources():
    """The torch adaptor's sources and include folders: beside this module in a package,
    else in the repository."""
    for root in (os.path.join(_HERE, "adaptor"), os.path.join(_HERE, os.pardir, os.pardir, "adaptor")):
        if os.path.isfile(os.path.join(root, "tessera_torch.cpp")):
            root = os.path.abspath(root)
            header = os.path.join(root, "tessera.h")
            include = root if os.path.isfile(header) else os.path.join(root, os.pardir, "include")
            return root, os.path.abspath(include)
    return None, None


def build_adaptor(verbose=False):
    """Compile the torch adaptor (adaptor/*.cpp: PyTorch's CUDAAllocator over tessera) against the
    torch in this process with torch.utils.cpp_extension, cached per torch and tessera version
    (TORCH_EXTENSIONS_DIR), and import it. Returns the module. `python -m tessera build`
    does this ahead of time."""
    import hashlib
    import torch
    from torch.utils import cpp_extension

    root, include = _adaptor_sources()
    if root is None:
        raise FileNotFoundError("the torch adaptor's sources (adaptor/tessera_torch.cpp) are not here")
    load()
    sources = [os.path.join(root, "tessera_torch.cpp"), os.path.join(root, "python_module.cpp")]
    digest = hashlib.sha1()
    for path in sources + [os.path.join(include, "tessera.h"), os.path.join(root, "tessera_torch.h")]:
        with open(path, "rb") as f:
            digest.update(f.read())
    tag = "".join(c if c.isalnum() else "_" for c in torch.__version__)
    name = f"tessera_adaptor_{tag}_{digest.hexdigest()[:10]}"
    return cpp_extension.load(
        name=name, sources=sources, extra_include_paths=[include, root],
        extra_cflags=["-O2"], extra_ldflags=[_lib_path, "-Wl,-rpath," + os.path.dirname(_lib_path)],
        with_cuda=True, verbose=verbose)  # CUDA's headers (the adaptor asks the runtime for free memory)


def install(lib_path=None, conf=None, adaptor=False):
    """Make tessera PyTorch's CUDA allocator. Call before anything initialises CUDA.

    With adaptor=True tessera is installed through the torch adaptor, compiled on first use
    against this torch (a C++ compiler is needed; cached afterwards): PyTorch's own memory APIs
    then work unchanged. Without it (the default for now), or where it cannot be built, tessera is
    installed as a plain CUDAPluggableAllocator; asked for the adaptor and falling back, it says
    once which of PyTorch's APIs then do not work. Returns "adaptor" or "plug-in" (calling again
    returns the same)."""
    global _allocator
    lib = load(lib_path)
    if _allocator is not None:
        if conf is not None:
            raise RuntimeError("tessera is already installed; conf can no longer change")
        return _allocator
    if conf is not None:
        configure(conf)
    check_config()
    for warning in config_warnings():  # PyTorch's keys pasted in that do not apply
        print(warning, file=sys.stderr)

    import torch  # lazily: the rest of the module works without torch

    if torch.cuda.is_initialized():
        raise RuntimeError(
            "tessera.install() must run before CUDA is initialised in this process "
            "(no CUDA tensor, torch.cuda.current_device(), set_device, ... before it): "
            "PyTorch can swap its allocator only once, before first use")
    why = "adaptor=False"
    if adaptor:
        try:
            module = build_adaptor()
        except Exception as e:  # no compiler, or a torch whose interface the adaptor does not know
            why = f"the torch adaptor could not be built ({str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__})"
        else:
            module.install()
            _allocator = "adaptor"
            return _allocator
    if adaptor:
        print(f"tessera: installed as a plain plug-in: {why}; then these need the adaptor: {_PLAIN_LACKS}",
              file=sys.stderr)
    alloc = torch.cuda.memory.CUDAPluggableAllocator(_lib_path, "tessera_malloc", "tessera_free")
    hooks = alloc.allocator()
    hooks.set_reset_fn(_fn_ptr(lib, "tessera_empty_cache"))            # torch.cuda.empty_cache()
    hooks.set_record_stream_fn(_fn_ptr(lib, "tessera_record_stream"))  # Tensor.record_stream()
    hooks.set_init_fn(_fn_ptr(lib, "tessera_init"))                    # CUDA lazy init
    hooks.set_memory_fraction_fn(_fn_ptr(lib, "tessera_set_memory_fraction"))  # set_per_process_memory_fraction
    torch.cuda.memory.change_current_allocator(alloc)
    _watch_graph_captures(torch, lib)
    _plugin = alloc  # noqa: F841  (PyTorch holds it; kept for the process's life)
    _allocator = "plug-in"
    return _allocator


def _watch_graph_captures(torch, lib):
    """Before the first CUDA graph capture (torch.cuda.graph, make_graphed_callables, or
    CUDAGraph.capture_begin itself), switch tessera's graph_pools on: memory the capture uses
    stays private to it. A pluggable allocator gets no hook of its own for captures."""
    cls = torch.cuda.graphs.CUDAGraph
    original = cls.capture_begin
    if getattr(original, "_tessera_watch", False):
        return

    def capture_begin(self, *args, **kwargs):
        if lib.tessera_watch_graphs() != 0:
            raise RuntimeError(f"tessera could not watch graph captures: {last_error()}")
        return original(self, *args, **kwargs)

    capture_begin._tessera_watch = True
    capture_begin.__doc__ = original.__doc__
    cls.capture_begin = capture_begin


def _default_device(device):
    """Device index of an int, a torch.device, "cuda[:N]" or None (the current device, else 0)."""
    if isinstance(device, str):
        _, _, index = device.partition(":")
        device = int(index) if index else None
    elif device is not None and not isinstance(device, int):
        device = device.index  # a torch.device; "cuda" without index means the current one
    if device is not None:
        return device
    torch = sys.modules.get("torch")  # never import torch here
    if torch is not None and torch.cuda.is_initialized():
        return torch.cuda.current_device()
    return 0


def _raw_stats(getter, *args):
    out = TesseraStats()
    if getter(*args, ctypes.byref(out)) != 0:
        raise RuntimeError(f"{getter.__name__}{args} failed: {last_error()}")
    return out


def _stats_dict(out, lib, counters=True):
    result = {}
    for i in range(len(out.gauges)):
        g = out.gauges[i]
        result[lib.tessera_gauge_name(i).decode()] = {
            "current": g.current, "peak": g.peak, "allocated": g.allocated, "freed": g.freed}
    if counters:
        for i in range(len(out.counters)):
            result[lib.tessera_counter_name(i).decode()] = int(out.counters[i])
    return result


def stats(device=None):
    """{gauge: {"current", "peak", "allocated", "freed"}, counter: int} for one device.

    Names come from the library (tessera_gauge_name / tessera_counter_name)."""
    lib = load()
    return _stats_dict(_raw_stats(lib.tessera_get_stats, _default_device(device)), lib)


def _arena_stats(device, arena):
    """The block-level gauges of one arena (0: small pool, 1: large pool); the others are 0."""
    lib = load()
    return _stats_dict(_raw_stats(lib.tessera_get_arena_stats, device, arena), lib, counters=False)


def reset_peak_stats(device=None):
    """Set every gauge's peak to its current value."""
    dev = _default_device(device)
    if load().tessera_reset_peak_stats(dev) != 0:
        raise RuntimeError(f"tessera_reset_peak_stats({dev}) failed: {last_error()}")


def empty_cache():
    """Release cached memory to the device (what torch.cuda.empty_cache() does once installed)."""
    load().tessera_empty_cache()


def release_graph_memory():
    """Declare that every CUDA graph captured so far is destroyed (del the torch.cuda.CUDAGraph
    objects first): the memory tessera kept private to them becomes reusable. Returns the bytes."""
    n = load().tessera_release_graph_pools()
    if n < 0:
        raise RuntimeError(last_error())
    return n


# ----- torch.cuda.memory_stats() and friends ---------------------------------------------

_FIELDS = ("current", "peak", "allocated", "freed")
_POOLS = (("all", None), ("small_pool", 0), ("large_pool", 1))  # torch's pool name, tessera's arena


def _read_text(fn, *args):
    """Call a (..., char* buf, size_t len) -> int64 function of the library; return the text."""
    size = fn(*args, None, 0)
    while True:
        if size < 0:
            raise RuntimeError(f"{fn.__name__}{args} failed: {last_error()}")
        buf = ctypes.create_string_buffer(size)
        needed = fn(*args, buf, size)
        if 0 <= needed <= size:
            return buf.value.decode()
        size = needed  # it grew between the two calls


def _stat(current=0, peak=0, allocated=0, freed=0):
    return {"current": current, "peak": peak, "allocated": allocated, "freed": freed}


def _largest_cached_block(device):
    """The largest cached block of the device (tessera_cache_info), in bytes."""
    out = ctypes.c_uint64()
    if load().tessera_cache_info(device, ctypes.byref(out)) != 0:
        raise RuntimeError(f"tessera_cache_info({device}) failed: {last_error()}")
    return out.value


def memory_stats(device=None):
    """torch.cuda.memory_stats() for tessera: an OrderedDict, sorted, with every key of
    PyTorch's native allocator, plus tessera's own under "tessera.".

    How tessera fills PyTorch's keys ({pool} is all, small_pool or large_pool; small_pool is
    tessera's small arena, requests up to small_size):
      allocated_bytes, requested_bytes   the gauges of the same name
      allocation                         active_blocks (blocks handed out)
      active, active_bytes               as allocation / allocated_bytes, plus the blocks freed
                                         with record_stream and still waiting for other streams
      inactive_split_bytes               cached_bytes (free and mapped, ready for reuse)
      reserved_bytes.all                 reserved_bytes: physical memory held, what nvidia-smi shows
      reserved_bytes.{small,large}_pool  mapped_bytes of that arena
      segment                            segments: maximal mapped runs of the arena
      inactive_split                     cached_blocks: free mapped blocks (those waiting whole in
                                         a front cache for their exact size each count)
      num_alloc_retries, num_ooms        alloc_retries, ooms
      num_device_alloc, num_device_free  driver_map_calls, driver_unmap_calls (torch: "includes cuMemMap")
      max_split_size                     -1 (tessera splits every block, as native's default)
      num_sync_all_streams, oversize_*   0 (no such thing in tessera)
    The extras: tessera.<gauge>.<field> and tessera.<counter> for every gauge and counter, and
    tessera.segments, .inactive_blocks, .largest_free_block (the largest cached block),
    .pending_free_bytes, .unmapped_reserved_bytes (physical memory held but mapped nowhere:
    reserved - mapped) and .reserved_unallocated_bytes (reserved - allocated).
    Everything comes from tessera's counters: reading changes nothing in the allocator. Each
    part is read under tessera's lock, but not all at one instant: while other threads
    allocate, derived keys may disagree slightly."""
    device = _default_device(device)
    dev = stats(device)
    arenas = {pool: _arena_stats(device, arena) for pool, arena in _POOLS if arena is not None}

    def gauge(pool, name):
        return (dev if pool == "all" else arenas[pool])[name]

    result = {}

    def put(name, pool, stat):
        for field in _FIELDS:
            result[f"{name}.{pool}.{field}"] = int(stat[field])

    for pool, _ in _POOLS:
        for name, source in (("allocated_bytes", "allocated_bytes"), ("requested_bytes", "requested_bytes"),
                             ("allocation", "active_blocks"), ("inactive_split_bytes", "cached_bytes")):
            put(name, pool, gauge(pool, source))
        put("reserved_bytes", pool, gauge(pool, "reserved_bytes" if pool == "all" else "mapped_bytes"))
        # Active: allocated, or freed but waiting for other streams (counted as freed once done).
        for name, base, extra in (("active_bytes", gauge(pool, "allocated_bytes"),
                                   gauge(pool, "pending_free_bytes")["current"]),
                                  ("active", gauge(pool, "active_blocks"),
                                   gauge(pool, "pending_free_blocks")["current"])):
            current = base["current"] + extra
            put(name, pool, _stat(current, max(base["peak"], current), base["allocated"],
                                  base["allocated"] - current))
        put("segment", pool, gauge(pool, "segments"))
        put("inactive_split", pool, gauge(pool, "cached_blocks"))
    for name in ("oversize_allocations", "oversize_segments"):
        for field in _FIELDS:
            result[f"{name}.{field}"] = 0
    result.update({
        "num_alloc_retries": dev["alloc_retries"], "num_ooms": dev["ooms"],
        "num_device_alloc": dev["driver_map_calls"], "num_device_free": dev["driver_unmap_calls"],
        "num_sync_all_streams": 0, "max_split_size": -1,
    })
    for name, value in dev.items():
        if isinstance(value, dict):
            for field in _FIELDS:
                result[f"tessera.{name}.{field}"] = value[field]
        else:
            result[f"tessera.{name}"] = value
    result.update({
        "tessera.segments": dev["segments"]["current"],
        "tessera.inactive_blocks": dev["cached_blocks"]["current"],
        "tessera.largest_free_block": _largest_cached_block(device),
        "tessera.pending_free_bytes": dev["pending_free_bytes"]["current"],
        "tessera.unmapped_reserved_bytes": max(
            0, dev["reserved_bytes"]["current"] - dev["mapped_bytes"]["current"]),
        "tessera.reserved_unallocated_bytes": max(
            0, dev["reserved_bytes"]["current"] - dev["allocated_bytes"]["current"]),
    })
    return collections.OrderedDict(sorted(result.items()))


def memory_allocated(device=None):
    """Bytes in allocated blocks now (torch.cuda.memory_allocated)."""
    return stats(device)["allocated_bytes"]["current"]


def max_memory_allocated(device=None):
    """Peak of memory_allocated() since the start or reset_peak_memory_stats()."""
    return stats(device)["allocated_bytes"]["peak"]


def memory_reserved(device=None):
    """Physical memory tessera holds now (torch.cuda.memory_reserved): what nvidia-smi counts."""
    return stats(device)["reserved_bytes"]["current"]


def max_memory_reserved(device=None):
    """Peak of memory_reserved() since the start or reset_peak_memory_stats()."""
    return stats(device)["reserved_bytes"]["peak"]


def reset_peak_memory_stats(device=None):
    """Set every peak to its current value (torch.cuda.reset_peak_memory_stats)."""
    reset_peak_stats(device)


def _fmt_size(value, scale_by):
    """A byte count in the unit that suits scale_by (the row's "all" value), PyTorch's format."""
    units = ("B  ", "KiB", "MiB", "GiB", "TiB", "PiB")
    unit = 0
    while unit + 1 < len(units) and scale_by >= 768 * 1024:
        value, scale_by, unit = value // 1024, scale_by / 1024, unit + 1
    return f"{value:6d} {units[unit]}"


def _fmt_count(value, scale_by):
    units = (" ", "K", "M")
    unit = 0
    while unit + 1 < len(units) and scale_by >= 750 * 1000:
        value, scale_by, unit = value // 1000, scale_by / 1000, unit + 1
    return f"{value:7d} {units[unit]} "


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def memory_summary(device=None, abbreviated=False):
    """torch.cuda.memory_summary() for tessera: the same table, filled from memory_stats(),
    with a few lines of tessera's own at the end. Returns the text."""
    device = _default_device(device)
    s = memory_stats(device)
    width = 75
    rule, double = "-" * width, "=" * width
    lines = [double,
             f" {'':16} tessera CUDA memory summary, device ID {device:<17d} ",
             rule,
             f"  {'':9} CUDA OOMs: {s['num_ooms']:<12d} | {'':6} cudaMalloc retries: {s['num_alloc_retries']:<8d}  ",
             double,
             "        Metric         | Cur Usage  | Peak Usage | Tot Alloc  | Tot Freed  "]
    rows = (("allocated_bytes", "Allocated memory", _fmt_size),
            ("active_bytes", "Active memory", _fmt_size),
            ("requested_bytes", "Requested memory", _fmt_size),
            ("reserved_bytes", "GPU reserved memory", _fmt_size),
            ("inactive_split_bytes", "Non-releasable memory", _fmt_size),
            ("allocation", "Allocations", _fmt_count),
            ("active", "Active allocs", _fmt_count),
            ("segment", "GPU reserved segments", _fmt_count),
            ("inactive_split", "Non-releasable allocs", _fmt_count))
    pools = [("all", None)] + ([] if abbreviated else [("large_pool", "      from large pool"),
                                                      ("small_pool", "      from small pool")])
    for key, title, fmt in rows:
        lines.append(rule)
        scale = {f: s[f"{key}.all.{f}"] for f in _FIELDS}
        for pool, label in pools:
            cells = " | ".join(fmt(s[f"{key}.{pool}.{f}"], scale[f]) for f in _FIELDS)
            lines.append(f" {label or title:<21} | {cells} ")
    for key, title in (("oversize_allocations", "Oversize allocations"),
                       ("oversize_segments", "Oversize GPU segments")):
        lines.append(rule)
        cells = " | ".join(_fmt_count(s[f"{key}.{f}"], s[f"{key}.{f}"]) for f in _FIELDS)
        lines.append(f" {title:<21} | {cells} ")
    lines.append(double)
    # tessera's lines: what PyTorch's table has no row for.
    extra = [
        f"tessera: {s['tessera.handles.current']} physical handles, "
        f"{_human(s['tessera.unmapped_reserved_bytes'])} held unmapped",
        f"largest free block {_human(s['tessera.largest_free_block'])} "
        f"in {s['tessera.inactive_blocks']} free blocks, {s['tessera.segments']} mapped runs",
        f"cache hits {s['tessera.cache_hits']}, misses {s['tessera.cache_misses']}, "
        f"cross-stream {s['tessera.cross_stream_reuses']}, reclaimed granules {s['tessera.reclaimed_granules']}",
        f"driver calls: create {s['tessera.driver_create_calls']}, release {s['tessera.driver_release_calls']}, "
        f"map {s['tessera.driver_map_calls']}, unmap {s['tessera.driver_unmap_calls']}",
    ]
    lines += [f" {text:<{width - 1}}"[:width] for text in extra]
    lines.append(double)
    return "|" + "|\n|".join(lines) + "|\n"


# ----- snapshots and history --------------------------------------------------------------

def snapshot():
    """torch.cuda.memory._snapshot() for tessera: {"segments": [...], "device_traces": [[...], ...],
    "allocator_settings": {...}, "external_annotations": []} for every device, in PyTorch's
    format, so that torch.cuda._memory_viz (segment_plot, trace_plot, stats, trace) and
    pytorch.org/memory_viz read it.

    Segments are the maximal mapped runs of each arena (is_expandable: true, as native
    expandable segments). device_traces holds the events recorded since
    record_memory_history(True), segment_map/segment_unmap included. tessera's frees complete
    at once, so each "free_requested" is followed by a "free_completed" (the viewers count that
    as the free; a block freed with record_stream completes later, which is not recorded).
    Frames are empty: tessera records no stack traces."""
    data = json.loads(_read_text(load().tessera_snapshot_json))
    for seg in data["segments"]:
        seg["segment_pool_id"] = tuple(seg["segment_pool_id"])
    traces = []
    for trace in data["device_traces"]:
        events = []
        for e in trace:
            e.setdefault("compile_context", "N/A")
            e.setdefault("user_metadata", "")
            events.append(e)
            if e["action"] == "free_requested":
                events.append(dict(e, action="free_completed"))
            elif e["action"] == "oom":
                e.setdefault("device_free", 0)  # torch's key; tessera's OOM message has the number
        traces.append(events)
    data["device_traces"] = traces
    conf = _conf if _conf is not None else os.environ.get("TESSERA_CONF", "")
    data["allocator_settings"] = {"allocator": f"tessera {version()}", "TESSERA_CONF": conf,
                                  "max_split_size": -1}
    data["external_annotations"] = []
    return data


def dump_snapshot(filename="dump_snapshot.pickle"):
    """Pickle snapshot() to a file (torch.cuda.memory._dump_snapshot): what
    `python -m torch.cuda._memory_viz trace_plot FILE -o out.html` and pytorch.org/memory_viz read."""
    data = snapshot()
    with open(filename, "wb") as f:
        pickle.dump(data, f)
    return data


def record_memory_history(enabled=True, max_entries=100000):
    """Start (enabled: True, "all" or "state") or stop (False or None) recording alloc, free,
    map, unmap and OOM events, keeping the last max_entries per device. Stopping drops them."""
    on = enabled not in (None, False, 0)
    if load().tessera_record_history(1 if on else 0, int(max_entries)) != 0:
        raise RuntimeError(f"tessera_record_history failed: {last_error()}")


def history_trace(device=None):
    """The recorded allocs and frees of a device as an allocation trace: `a|f ADDR SIZE STREAM`
    lines after a `#` header, replayable with `target/release/tessera-replay FILE`."""
    return _read_text(load().tessera_history_trace, _default_device(device))


def dump_history_trace(path, device=None):
    """Write history_trace(device) to path; returns the number of events written."""
    text = history_trace(device)
    with open(path, "w") as f:
        f.write(text)
    return sum(1 for line in text.splitlines() if line[:1] in ("a", "f"))


# ----- out of memory --------------------------------------------------------------------

def on_oom(fn):
    """Register fn(device, size): tessera calls it when a request of size bytes cannot be met,
    on the allocating thread, with no tessera lock held (it may free tensors, gc.collect(),
    empty_cache()); after every callback ran, tessera tries the request once more. An exception
    in fn is printed to stderr and ignored. Callbacks stay registered for the process's life.
    Returns fn, so it works as a decorator."""
    if not callable(fn):
        raise TypeError(f"on_oom needs a callable, not {fn!r}")

    def trampoline(device, size, _user_data):
        try:
            fn(device, size)
        except BaseException:  # never let anything unwind into the library
            print(f"tessera: exception in OOM callback {fn!r} (ignored):", file=sys.stderr)
            traceback.print_exc()

    callback = _OOM_CALLBACK(trampoline)
    with _lock:
        _oom_callbacks.append((fn, callback))  # the library holds the pointer forever
    if load().tessera_register_oom_callback(callback, None) != 0:
        raise RuntimeError(f"tessera_register_oom_callback failed: {last_error()}")
    return fn


# ----- monitoring --------------------------------------------------------------------------

def status_line(device=None):
    """One line from the library (tessera_status_line): allocated, reserved, their peaks,
    fragmentation (1 - allocated / reserved), OOMs; of one device, or of every device in use
    for device="all"."""
    device = -1 if device == "all" else _default_device(device)
    return _read_text(load().tessera_status_line, device)


def monitor(interval_s=10, file=None, device=None):
    """Print status_line(device) to file (default: sys.stderr) every interval_s seconds from a
    daemon thread. Returns stop(), which ends the thread (idempotent). From another process,
    use TESSERA_CONF's status_interval:N instead."""
    if interval_s <= 0:
        raise ValueError(f"interval_s must be positive, not {interval_s}")
    device = _default_device(device)  # resolved here: the current device is per thread
    done = threading.Event()

    def run():
        while not done.wait(interval_s):
            try:
                line = status_line(device)
            except Exception as e:  # keep monitoring through a transient failure
                line = f"tessera device {device}: status unavailable: {e}"
            print(line, file=file or sys.stderr, flush=True)

    thread = threading.Thread(target=run, name="tessera-monitor", daemon=True)
    thread.start()

    def stop():
        done.set()
        if thread is not threading.current_thread():
            thread.join(timeout=max(1.0, 2 * interval_s))

    return stop


# ----- configuration options and `python -m tessera` ------------------------------------

# TESSERA_CONF keys: (name, default, meaning). The library's own list is the authority
# (tests/python checks that the two agree).
def options():
    """The configuration options, from the library: a list of (name, default, meaning)."""
    rows = json.loads(_read_text(load().tessera_options_json))
    return [(o["name"], o["default"], o["doc"]) for o in rows]


def _usage():
    opts = options()
    width = max(len(name) for name, _, _ in opts)
    dwidth = max(len("default"), *(len(default) for _, default, _ in opts))
    table = "\n".join(f"  {name:<{width}}  {default:<{dwidth}}  {meaning}" for name, default, meaning in opts)
    return (f"{__doc__.strip()}\n\n"
            "Configuration: TESSERA_CONF=\"key:value,key:value\" (PyTorch's PYTORCH_CUDA_ALLOC_CONF syntax),\n"
            "or install(conf=...), read once at the first allocation. Byte values take K, M, G, T.\n\n"
            f"  {'key':<{width}}  {'default':<{dwidth}}  meaning\n{table}\n")


def _main(argv):
    if argv[:1] == ["build"]:
        module = build_adaptor(verbose="-v" in argv)
        print(f"tessera: the torch adaptor is built: {module.__file__}")
        return 0
    out = _usage()
    if "--status" in argv:
        out = ("tessera: --status cannot attach to another process. In the process itself, call\n"
               "tessera.monitor(interval_s) or print(tessera.memory_summary()); from outside,\n"
               "start it with TESSERA_CONF=status_interval:N (a status line every N s on stderr).\n\n" + out)
    sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
