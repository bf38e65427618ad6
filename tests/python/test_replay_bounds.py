"""tessera-replay under hostile input: bounded memory and messages, exact exits, no panics."""

import gzip
import json
import os
import subprocess
import sys

from test_sim_traces import REPLAY


def run(*args, **kw):
    return subprocess.run([REPLAY, *map(str, args)], capture_output=True, text=True, timeout=120, **kw)


def test_help_is_usage_on_stdout_and_exit_0():
    r = run("--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: tessera-replay") and r.stderr == ""


def test_a_gzip_bomb_of_one_line_is_refused_in_little_memory(tmp_path):
    bomb = tmp_path / "bomb.trace.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        chunk = b"9" * (1 << 20)
        f.write(b"a ")
        for _ in range(256):  # one line of 256 MiB
            f.write(chunk)
    assert bomb.stat().st_size < 2 << 20
    # The peak RSS of that one process: measured by a fresh interpreter that runs only it
    # (this process's children's maximum counts every child before it).
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.stderr.write(r.stderr)")
    p = subprocess.run([sys.executable, "-c", probe, REPLAY, str(bomb)], capture_output=True, text=True, timeout=120)
    rc, peak_kib = map(int, p.stdout.split())
    assert rc == 2 and "line 1: longer than 4096 bytes" in p.stderr, p.stderr[:300]
    assert len(p.stderr) < 2000, "the line was echoed"
    assert peak_kib < 200 << 10, f"{peak_kib} KiB of RSS for a refused line"


def test_a_huge_config_value_is_quoted_not_echoed(tmp_path):
    trace = tmp_path / "t.trace"
    trace.write_text("a 1 512 0\nf 1 512 0\n")
    r = run(trace, "--conf", "page_size:" + "7" * (100 << 10))  # an argument's limit is 128 KiB
    assert r.returncode == 2 and "(102400 bytes)" in r.stderr and len(r.stderr) < 2000, r.stderr[:300]


def test_sizes_that_cannot_round_are_refused_not_wrapped(tmp_path):
    trace = tmp_path / "huge.trace"
    trace.write_text("a 4096 18446744073709551615 0\n")
    r = run(trace, "--frontier")
    assert r.returncode == 2 and "negative or absurd" in r.stderr, r.stdout + r.stderr


def test_live_bytes_saturate_instead_of_wrapping(tmp_path):
    trace = tmp_path / "big.trace"
    trace.write_text("".join(f"a {i} {1 << 62} 0\n" for i in range(1, 6)))
    report = json.loads(run(trace).stdout.splitlines()[-1])
    assert report["peak_live_bytes"] == (1 << 64) - 1  # five of 2^62: past u64, held at its top
    assert report["oom_at_event"] == 0  # 4 EiB is more than the 80 GiB sim device


def test_a_duplicate_live_address_is_an_error(tmp_path):
    trace = tmp_path / "dup.trace"
    trace.write_text("a 4096 512 0\na 4096 1024 0\n")
    r = run(trace)
    assert r.returncode == 2 and "event 1: address 4096 allocated again while live" in r.stderr, r.stderr


def test_a_free_never_allocated_is_an_error_at_its_event(tmp_path):
    trace = tmp_path / "stray.trace"
    trace.write_text("a 4096 512 0\nf 4096 512 0\nf 8192 512 0\n")
    r = run(trace)
    assert r.returncode == 2 and "event 2: free of 8192 never allocated" in r.stderr, r.stderr


def test_a_bad_event_after_an_oom_is_not_reached(tmp_path):
    trace = tmp_path / "late.trace"
    trace.write_text(f"a 4096 {1 << 62} 0\nf 8192 512 0\n")
    r = run(trace)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["oom_at_event"] == 0


def test_a_reader_that_goes_away_ends_it_quietly():
    data = os.path.join(os.path.dirname(REPLAY), os.pardir, os.pardir, "tests", "data", "kv_grow.trace.gz")
    p = subprocess.Popen([REPLAY, data, "--timeline", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()  # `| head -1`
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and "panicked" not in err, err
