"""Helpers shared by the GPU tests (tests/gpu/t_*.py); each test runs as its own process.

Conventions read by run.sh: a line `NOTE: ...` is shown in the summary table (the last
one wins); exit status 0 means pass.
"""

import gc
import json
import os
import subprocess
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
# The Python package (python/) and the training example (examples/).
PYTHON_PATHS = [os.path.join(REPO, "python"), os.path.join(REPO, "examples")]
sys.path[:0] = PYTHON_PATHS
MiB = 1 << 20


def note(msg):
    print(f"NOTE: {msg}", flush=True)


def check(cond, msg):
    """Assert that survives python -O and says what went wrong."""
    if not cond:
        raise AssertionError(msg)


def settle(torch):
    """Drop dead tensors and wait for the GPU so that stats are final."""
    gc.collect()
    torch.cuda.synchronize()


def install(conf=None, adaptor=True):
    """Install tessera (conf: TESSERA_CONF syntax; through the torch adaptor unless adaptor is
    False), then import and return torch."""
    import tessera_torch
    tessera_torch.install(conf=conf, adaptor=adaptor)
    import torch
    torch.cuda.init()
    return torch, tessera_torch


def pin_children(n_cpus):
    """Pin this process, and so the children it starts, to the same n_cpus CPUs (the middle
    ones allowed), so that the processes compared differ in their allocator and not in their
    CPUs. It does not remove the GPU hosts' per-process speed modes: pinned or not, a
    torch.empty + del pair took 2.0-2.4 us in some processes and 3.6-4.5 us in others, with
    every allocator (H200, 12 single processes)."""
    cpus = sorted(os.sched_getaffinity(0))
    start = max(0, (len(cpus) - n_cpus) // 2)
    chosen = set(cpus[start:start + n_cpus])
    os.sched_setaffinity(0, chosen)
    return sorted(chosen)


def run_json(cmd, timeout, env=None):
    """Run cmd (a list); return (the last stdout line that parses as a JSON object, the process)."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (*PYTHON_PATHS, full_env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    summary = last_json(proc.stdout)
    if summary is None:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode} without a JSON summary")
    return summary, proc


def last_json(text):
    """The last line of text that parses as a JSON object, or None."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                pass
    return None
