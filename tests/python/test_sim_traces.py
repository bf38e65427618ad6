"""The CPU-side generator of bench_frontier's multistream trace (tests/sim/multistream_trace.py)."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, os.pardir, os.pardir))
sys.path.insert(0, os.path.join(REPO, "tests", "sim"))

import multistream_trace  # noqa: E402


def peak_live(lines):
    live, peak, sizes = 0, 0, {}
    for line in lines:
        op, addr, size, _ = line.split()
        if op == "a":
            assert addr not in sizes, "an address allocated twice"
            sizes[addr] = int(size)
            live += int(size)
            peak = max(peak, live)
        else:
            live -= sizes.pop(addr)
    assert not sizes, "every block is freed"
    return peak


def test_seed_0_has_the_gpu_runs_peak():
    # bench_frontier.py's multistream on an H100: tessera's and expandable_segments' peak
    # allocated bytes, 95,605,760.
    assert peak_live(multistream_trace.trace(0)) == 95_605_760


def test_trace_replays(tmp_path):
    exe = os.path.join(REPO, "target", "release", "tessera-replay")
    path = tmp_path / "ms.trace"
    path.write_text("\n".join(multistream_trace.trace(1, iters=300)) + "\n")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, check=True).stdout
    assert '"peak_live_bytes":%d' % peak_live(multistream_trace.trace(1, iters=300)) in out
