"""Snapshots and history: the library's snapshot in torch.cuda.memory._snapshot()'s shape (for
PyTorch's memory viewer), recording of alloc/free/map/unmap/OOM events, and the history as a
trace that tessera-replay replays."""

import json
import os
import pickle

from . import _library
from ._library import _read_text, last_error, load, version
from ._stats import _default_device


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
    conf = _library._conf if _library._conf is not None else os.environ.get("TESSERA_CONF", "")
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
