"""Tags: sleep and wake. Allocations made inside `with tessera.region("kv_cache"):` belong to
that tag; `tessera.pause(tag)` gives their physical memory back to the driver and keeps every
address (tensors and captured CUDA graphs stay valid), `tessera.resume(tag)` maps memory there
again. With `backup="cpu"` the contents survive (copied to page-locked host memory and back);
without, they are lost and must be rewritten before use. Untagged memory is never paused.

The tag is the calling thread's: allocations that PyTorch makes on its own threads (autograd's
backward on the GPU's worker thread) are untagged. A kernel that touches paused memory is a bug
in the program: it faults, or reads and writes whatever is mapped there later. Importing this
module does not import torch."""

import contextlib
import sys

from ._library import _read_text, last_error, load
from ._stats import _default_device, _raw_stats, _stats_dict


class OutOfMemoryError(MemoryError):
    """A resume that could not get its memory, where torch is not imported (with torch, the
    error raised is torch.cuda.OutOfMemoryError). The tag stays paused with its backups."""


def current_tag():
    """The calling thread's current tag ("" if none)."""
    return _read_text(load().tessera_get_tag)


def _set(tag):
    if load().tessera_set_tag(tag.encode() if tag else None) != 0:
        raise ValueError(last_error())


@contextlib.contextmanager
def region(tag):
    """Allocations this thread makes inside belong to `tag` (nested regions: the innermost)."""
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"a tag is a non-empty string, not {tag!r}")
    previous = current_tag()
    _set(tag)
    try:
        yield
    finally:
        _set(previous)


def _oom(message):
    torch = sys.modules.get("torch")
    cls = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) or OutOfMemoryError
    return cls(message)


def pause(tag, backup=None):
    """Give `tag`'s physical memory back to the driver on every device, keeping its addresses.
    backup=None: the contents are lost; backup="cpu": copied to page-locked host memory first
    and restored by resume(). Waits for the streams that used the memory. Returns the bytes
    given back."""
    if backup not in (None, "cpu"):
        raise ValueError(f"backup is None or 'cpu', not {backup!r}")
    n = load().tessera_pause(tag.encode(), 1 if backup == "cpu" else 0)
    if n < 0:
        raise RuntimeError(f"tessera.pause({tag!r}): {last_error()}")
    return int(n)


def resume(tag):
    """Map memory at `tag`'s addresses again on every device and restore its backups. Raises
    torch.cuda.OutOfMemoryError (tessera.OutOfMemoryError without torch) if the memory is not
    there: the tag stays paused with its backups, and resume() may be called again. Returns the
    bytes mapped."""
    n = load().tessera_resume(tag.encode())
    if n < 0:
        message = last_error()
        if message.startswith("CUDA out of memory"):
            raise _oom(message)
        raise RuntimeError(f"tessera.resume({tag!r}): {message}")
    return int(n)


def tag_stats(tag, device=None):
    """tessera's gauges and counters of `tag`'s memory on one device, as stats() gives them:
    `paused_bytes` is what a pause gave back, `backup_bytes` the host copies held (a pause's, and
    those a resume keeps with keep_backups:true in TESSERA_CONF)."""
    lib = load()
    dev = _default_device(device)
    return _stats_dict(_raw_stats(lib.tessera_get_tag_stats, dev, tag.encode()), lib)
