"""tessera for PyTorch: load libtessera.so, install it as PyTorch's CUDA allocator, read its stats.

    import tessera_torch
    tessera_torch.install(conf="expandable_segments:true")   # before any CUDA use
    print(tessera_torch.stats())                               # torch.cuda.memory_stats() raises with a pluggable allocator

Importing this module does not import torch; only install() does. The library is
looked up in $TESSERA_LIB, then <repo>/target/release/libtessera.so, then next to
this file.
"""

import ctypes
import os
import sys
import threading

__all__ = [
    "find_library", "load", "install", "stats", "reset_peak_stats",
    "empty_cache", "version", "configure", "check_config", "last_error",
]

_LIB_NAME = "libtessera.so"
_HERE = os.path.dirname(os.path.abspath(__file__))

_lock = threading.Lock()
_lib = None          # the singleton CDLL
_lib_path = None     # the path it was loaded from
_allocator = None    # the CUDAPluggableAllocator that install() swapped in


class TesseraStat(ctypes.Structure):
    """One gauge: current and peak value, cumulative increments and decrements."""
    _fields_ = [("current", ctypes.c_int64), ("peak", ctypes.c_int64),
                ("allocated", ctypes.c_int64), ("freed", ctypes.c_int64)]


# TesseraStats has TESSERA_GAUGE_COUNT gauges and TESSERA_COUNTER_COUNT counters;
# the counts come from the library at load time, see _stats_type().
TesseraStats = None


def find_library():
    """Path of libtessera.so: $TESSERA_LIB, the repo's target/release, or next to this module."""
    env = os.environ.get("TESSERA_LIB")
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError(f"TESSERA_LIB={env} does not exist")
        return env
    candidates = [
        os.path.join(_HERE, os.pardir, "target", "release", _LIB_NAME),
        os.path.join(_HERE, _LIB_NAME),
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
    lib.tessera_get_stats.restype = c_i32
    lib.tessera_get_stats.argtypes = [c_i32, ctypes.POINTER(TesseraStats)]


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
    if load().tessera_configure(conf.encode()) != 0:
        raise ValueError(f"tessera_configure({conf!r}) failed: {last_error()}")


def check_config():
    """Validate the active config ($TESSERA_CONF or configure()); raises ValueError if invalid."""
    if load().tessera_check_config() != 0:
        raise ValueError(f"invalid tessera config: {last_error()}")


def _fn_ptr(lib, name):
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value


def install(lib_path=None, conf=None):
    """Make tessera PyTorch's CUDA allocator. Call before anything initialises CUDA.

    Returns the torch.cuda.memory.CUDAPluggableAllocator (calling again returns it)."""
    global _allocator
    lib = load(lib_path)
    if _allocator is not None:
        if conf is not None:
            raise RuntimeError("tessera is already installed; conf can no longer change")
        return _allocator
    if conf is not None:
        configure(conf)
    check_config()

    import torch  # lazily: the rest of the module works without torch

    if torch.cuda.is_initialized():
        raise RuntimeError(
            "tessera_torch.install() must run before CUDA is initialised in this process "
            "(no CUDA tensor, torch.cuda.current_device(), set_device, ... before it): "
            "PyTorch can swap its allocator only once, before first use")
    alloc = torch.cuda.memory.CUDAPluggableAllocator(_lib_path, "tessera_malloc", "tessera_free")
    hooks = alloc.allocator()
    hooks.set_reset_fn(_fn_ptr(lib, "tessera_empty_cache"))            # torch.cuda.empty_cache()
    hooks.set_record_stream_fn(_fn_ptr(lib, "tessera_record_stream"))  # Tensor.record_stream()
    hooks.set_init_fn(_fn_ptr(lib, "tessera_init"))                    # CUDA lazy init
    hooks.set_memory_fraction_fn(_fn_ptr(lib, "tessera_set_memory_fraction"))  # set_per_process_memory_fraction
    torch.cuda.memory.change_current_allocator(alloc)
    _allocator = alloc
    return alloc


def _default_device(device):
    if device is not None and not isinstance(device, int):
        device = device.index  # a torch.device; "cuda" without index means the current one
    if device is not None:
        return device
    torch = sys.modules.get("torch")  # never import torch here
    if torch is not None and torch.cuda.is_initialized():
        return torch.cuda.current_device()
    return 0


def stats(device=None):
    """{gauge: {"current", "peak", "allocated", "freed"}, counter: int} for one device.

    Names come from the library (tessera_gauge_name / tessera_counter_name)."""
    lib = load()
    dev = _default_device(device)
    out = TesseraStats()
    if lib.tessera_get_stats(dev, ctypes.byref(out)) != 0:
        raise RuntimeError(f"tessera_get_stats({dev}) failed: {last_error()}")
    result = {}
    for i in range(len(out.gauges)):
        g = out.gauges[i]
        result[lib.tessera_gauge_name(i).decode()] = {
            "current": g.current, "peak": g.peak, "allocated": g.allocated, "freed": g.freed}
    for i in range(len(out.counters)):
        result[lib.tessera_counter_name(i).decode()] = int(out.counters[i])
    return result


def reset_peak_stats(device=None):
    """Set every gauge's peak to its current value."""
    dev = _default_device(device)
    if load().tessera_reset_peak_stats(dev) != 0:
        raise RuntimeError(f"tessera_reset_peak_stats({dev}) failed: {last_error()}")


def empty_cache():
    """Release cached memory to the device (what torch.cuda.empty_cache() does once installed)."""
    load().tessera_empty_cache()
