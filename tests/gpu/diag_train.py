"""Where train_gpt.py's time goes with each allocator (a diagnostic, not a test):
    python3 tests/gpu/diag_train.py [--runs N]
Runs train_gpt.py alternately with the native allocator, tessera through the adaptor, as a
plain plug-in, and through the adaptor with the driver thread on, pinned to the same CPUs;
prints each configuration's median steps/s and what its timed window cost the allocator
(train_gpt.py's `timed_window`: allocations, misses, driver calls and time)."""

import argparse
import statistics
import sys

from gpu_util import pin_children, run_json

p = argparse.ArgumentParser()
p.add_argument("--runs", type=int, default=3)
p.add_argument("--steps", type=int, default=30)
p.add_argument("--lib", action="append", default=[], metavar="NAME=PATH",
               help="another tessera build, run through the adaptor as configuration NAME")
p.add_argument("--conf", action="append", default=[], metavar="NAME=CONF",
               help="tessera through the adaptor with configuration CONF, as configuration NAME")
p.add_argument("--only", default=None, help="comma-separated configurations to run (default all)")
args = p.parse_args()
CONFIGS = (("native", ["--native"]), ("adaptor", []), ("plug-in", ["--plug-in"]),
           ("adaptor+thread", ["--conf", "driver_thread:true"]),
           *((name, ["--lib", path]) for name, _, path in (x.partition("=") for x in args.lib)),
           *((name, ["--conf", conf]) for name, _, conf in (x.partition("=") for x in args.conf)))
if args.only:
    CONFIGS = tuple(c for c in CONFIGS if c[0] in args.only.split(","))
print(f"every run on CPUs {pin_children(4)}")
speeds, windows = {}, {}
for _ in range(args.runs):
    for name, extra in CONFIGS:
        cmd = [sys.executable, "examples/train_gpt.py", "--steps", str(args.steps), "--seed", "1234",
               "--print-every", "1000"] + extra
        summary, _ = run_json(cmd, timeout=120)
        speeds.setdefault(name, []).append(summary["steps_per_s"])
        windows.setdefault(name, []).append(summary["timed_window"])
        print(f"RUN {name}: {summary['steps_per_s']:.1f} steps/s  launch {summary['launch_us']:.2f} us  window {summary['timed_window']}", flush=True)
nat = statistics.median(speeds["native"])
for name, _ in CONFIGS:
    v = speeds[name]
    med = statistics.median(v)
    print(f"{name:15s} median {med:6.1f} steps/s ({min(v):.1f}-{max(v):.1f}) {med / nat:.3f}x  "
          f"last window {windows[name][-1]}")
