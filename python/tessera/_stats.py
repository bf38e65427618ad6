"""Statistics: tessera's gauges and counters by name (stats()), and PyTorch's shapes of them:
torch.cuda.memory_stats()'s keys (memory_stats()), its one-number functions and
memory_summary()'s table. Everything is read from the library's counters; reading changes
nothing in the allocator. Importing this module does not import torch."""

import collections
import ctypes
import sys

from . import _library
from ._library import last_error, load


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
    out = _library.TesseraStats()
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


_FIELDS = ("current", "peak", "allocated", "freed")
_POOLS = (("all", None), ("small_pool", 0), ("large_pool", 1))  # torch's pool name, tessera's arena


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
