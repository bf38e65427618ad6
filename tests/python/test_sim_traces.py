"""The CPU-side generators of bench_frontier's traces (tests/sim/multistream_trace.py, churn_trace.py, kv_trace.py)."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, os.pardir, os.pardir))
sys.path.insert(0, os.path.join(REPO, "tests", "sim"))

import churn_trace  # noqa: E402
import kv_trace  # noqa: E402
import multistream_trace  # noqa: E402

REPLAY = os.path.join(REPO, "target", "release", "tessera-replay")


def replay_report(path, *args):
    """tessera-replay's JSON report of the trace at `path`."""
    out = subprocess.run([REPLAY, str(path), *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


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
    path = tmp_path / "ms.trace"
    path.write_text("\n".join(multistream_trace.trace(1, iters=300)) + "\n")
    out = subprocess.run([REPLAY, str(path)], capture_output=True, text=True, check=True).stdout
    assert '"peak_live_bytes":%d' % peak_live(multistream_trace.trace(1, iters=300)) in out


def test_churn_keeps_its_live_set_under_3_gib():
    # wl_churn drops live tensors while the requested bytes would pass 3 GiB; rounding to 512 B
    # adds at most 511 B per live block. Its GPU runs report 3.00 GiB peak allocated.
    lines = churn_trace.trace(0)
    assert len(lines) == 2 * 3000
    peak = peak_live(lines)
    assert 2.95 * (1 << 30) < peak <= 3 * (1 << 30) + 511 * 3000


def test_churn_trace_replays(tmp_path):
    path = tmp_path / "churn.trace"
    lines = churn_trace.trace(2, ops=500)
    path.write_text("\n".join(lines) + "\n")
    out = subprocess.run([REPLAY, str(path)], capture_output=True, text=True, check=True).stdout
    assert '"peak_live_bytes":%d' % peak_live(lines) in out


def test_kv_seed_0_has_the_gpu_runs_peak():
    # bench_frontier.py's kvcache on an H100: tessera's peak allocated bytes, 2,149,711,872; a
    # second run in the same process (bench_time.py) repeats the first.
    assert peak_live(kv_trace.trace(0)) == 2_149_711_872
    two = kv_trace.trace(0, runs=2)
    assert len(two) == 2 * len(kv_trace.trace(0))
    assert peak_live(two) == 2_149_711_872


def test_sweep_replays_every_trace():
    out = subprocess.run([sys.executable, os.path.join(REPO, "tests", "sim", "sweep.py"), "--seeds", "2"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.endswith(tuple("0123456789")) and "seeds" not in line]
    names = {r[0] for r in rows}
    assert {"gpt_varlen.trace.gz", "kv_grow.trace.gz", "churn_x4.trace", "kv_x6.trace"} <= names, out
    for name, frontier, reserved, maps, driver_ms in rows:
        # No trace completes in less than its peak live bytes, nor holds less than it at the peak.
        assert float(frontier) >= 1.0 and float(reserved) >= 1.0, name
        assert int(maps) > 0 and float(driver_ms) > 0, name
    assert "2 multi-stream seeds: frontier mean" in out


def test_frontier_completes_and_one_step_less_does_not(tmp_path):
    # Seed 0's uncapped replay reserves at most 98 MiB, yet the replay capped at 98 MiB runs out
    # (a capacity changes the policy near it); the frontier is the capacity seen to complete:
    # 100 MiB, what bench_frontier.py measures on an H100/H200 once the driver's floor is left out.
    path = tmp_path / "ms0.trace"
    path.write_text("\n".join(multistream_trace.trace(0)) + "\n")
    frontier = replay_report(path, "--frontier")["frontier_bytes"]
    assert replay_report(path, "--capacity", str(frontier)).get("oom_at_event") is None
    assert replay_report(path, "--capacity", str(frontier - (2 << 20))).get("oom_at_event") is not None


def test_a_memory_limit_that_stops_the_replay_is_reported(tmp_path):
    # Without --capacity, a memory_limit under the peak live bytes stops the replay: the report
    # names the event and the message (it used to read as a complete run).
    path = tmp_path / "ms.trace"
    lines = multistream_trace.trace(1, iters=300)
    path.write_text("\n".join(lines) + "\n")
    limit = peak_live(lines) // 2
    report = replay_report(path, "--conf", "memory_limit:%d" % limit)
    assert report["oom_at_event"] is not None and "out of memory" in report["oom_message"]
    assert replay_report(path)["oom_at_event"] is None
