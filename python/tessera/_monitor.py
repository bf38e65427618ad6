"""Out of memory and monitoring: Python callbacks the library runs before it gives up on a
request (they are kept for the process's life, as the library keeps their pointers), the
status line, and a monitor thread that prints it and stops when asked."""

import sys
import threading
import traceback

from . import _library
from ._library import _read_text, last_error, load
from ._stats import _default_device


_oom_callbacks = []  # (fn, CFUNCTYPE object): the library keeps the pointers forever, so do we


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

    callback = _library._OOM_CALLBACK(trampoline)
    with _library._lock:
        _oom_callbacks.append((fn, callback))  # the library holds the pointer forever
    if load().tessera_register_oom_callback(callback, None) != 0:
        raise RuntimeError(f"tessera_register_oom_callback failed: {last_error()}")
    return fn


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
