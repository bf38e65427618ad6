"""tessera for PyTorch: load libtessera.so, install it as PyTorch's CUDA allocator, read its stats.

    import tessera
    tessera.install()                      # before any CUDA use: PyTorch's own APIs then work
    print(torch.cuda.memory_summary())

install() installs tessera through the torch adaptor (PyTorch's CUDAAllocator over tessera,
compiled against this torch on first use; `python -m tessera build` does it ahead of time).
Where it cannot be built, or with install(adaptor=False), tessera is a plain plug-in, under
which torch.cuda.memory_stats, memory_allocated, max_memory_reserved, memory_summary and
memory._snapshot raise; this module gives them back either way, with the same names,
signatures and shapes:

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
    region(tag), pause(tag, backup=None|"cpu"), resume(tag), tag_stats(tag, device)
                                    sleep and wake: a tag's memory goes back to the driver and
                                    returns at the same addresses (see tessera._tags)

Importing this module does not import torch; only install() does. The library is
looked up in $TESSERA_LIB, then in this package (pip install), then in the repository's
target/release. `python -m tessera` prints this text and the configuration options;
`tessera_torch` is the same module under its former name.
"""

from ._history import dump_history_trace, dump_snapshot, history_trace, record_memory_history, snapshot
from ._install import build_adaptor, install, release_graph_memory
from ._library import (check_config, config_warnings, configure, find_library, last_error, load, options,
                       TesseraStat, version)
from ._monitor import monitor, on_oom, status_line
from ._stats import (empty_cache, max_memory_allocated, max_memory_reserved, memory_allocated, memory_reserved,
                     memory_stats, memory_summary, reset_peak_memory_stats, reset_peak_stats, stats)
from ._tags import OutOfMemoryError, current_tag, pause, region, resume, tag_stats
from ._cli import _main

__all__ = [
    "release_graph_memory",
    "find_library", "load", "install", "stats", "reset_peak_stats",
    "empty_cache", "version", "configure", "check_config", "config_warnings", "last_error",
    "memory_stats", "memory_allocated", "max_memory_allocated", "memory_reserved",
    "max_memory_reserved", "reset_peak_memory_stats", "memory_summary",
    "snapshot", "dump_snapshot", "record_memory_history", "history_trace", "dump_history_trace",
    "on_oom", "monitor", "status_line", "options", "build_adaptor",
    "region", "pause", "resume", "tag_stats", "current_tag", "OutOfMemoryError",
]


def __getattr__(name):
    # TesseraStats is made when the library loads (its sizes are the library's).
    if name == "TesseraStats":
        from . import _library
        return _library.TesseraStats
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
