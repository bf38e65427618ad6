"""The library: finds and loads libtessera.so once, declares its C functions for ctypes, and
reads its configuration, options and text outputs. Every other module reaches the library
through load(); none keeps a handle of its own. TesseraStats is made at load time, from the
gauge and counter counts the library reports."""

import ctypes
import json
import os
import threading


_LIB_NAME = "libtessera.so"
_HERE = os.path.dirname(os.path.abspath(__file__))


_lock = threading.Lock()
_lib = None          # the singleton CDLL
_lib_path = None     # the path it was loaded from
_conf = None         # the string given to configure(), if any


# void (*)(int device, uint64_t size, void* user_data): see on_oom().
_OOM_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_uint64, ctypes.c_void_p)


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
        "tessera_set_tag": (c_i32, [ctypes.c_char_p]),
        "tessera_clear_tag": (None, []),
        "tessera_get_tag": (i64, [vp, usize]),
        "tessera_pause": (i64, [ctypes.c_char_p, c_int]),
        "tessera_resume": (i64, [ctypes.c_char_p]),
        "tessera_get_tag_stats": (c_i32, [c_int, ctypes.c_char_p, ctypes.POINTER(TesseraStats)]),
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


def config_warnings():
    """The warnings of the configuration in force: PyTorch's keys (from a pasted
    PYTORCH_CUDA_ALLOC_CONF) that tessera accepted but that do not apply, each with why."""
    text = _read_text(load().tessera_config_warnings)
    return text.splitlines() if text else []


# TESSERA_CONF keys: (name, default, meaning). The library's own list is the authority
# (tests/python checks that the two agree).
def options():
    """The configuration options, from the library: a list of (name, default, meaning)."""
    rows = json.loads(_read_text(load().tessera_options_json))
    return [(o["name"], o["default"], o["doc"]) for o in rows]
