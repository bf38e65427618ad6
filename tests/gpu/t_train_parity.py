"""Training parity: train_gpt.py with the native allocator and with tessera, through the torch
adaptor and as a plain plug-in, same seed.

Losses must agree to 1e-4 (the allocator must not change any result); tessera's speed is
reported, and fails the test only under 0.8x native. The runs alternate (native, adaptor,
plug-in, three times) and each configuration's median steps/s counts, with its spread:
single runs of this small model swing by 1.5x on their own. Each run also reports its process's
speed (train_gpt.py's `launch_us`: us per small kernel launch, no allocation), which explains
most of that swing; the note gives its median per configuration beside the steps/s.
"""

import statistics
import sys

from gpu_util import check, note, pin_children, run_json

STEPS = 30
RUNS = 3
CONFIGS = (("native", ["--native"]), ("adaptor", []), ("plug-in", ["--plug-in"]))
print(f"every run on CPUs {pin_children(4)}")
results, speeds, launches = {}, {}, {}
for _ in range(RUNS):
    for name, extra in CONFIGS:
        cmd = [sys.executable, "examples/train_gpt.py", "--steps", str(STEPS), "--seed", "1234"] + extra
        summary, proc = run_json(cmd, timeout=110)
        check(proc.returncode == 0, f"{name} run exited {proc.returncode}")
        got = summary.get("path") or summary.get("allocator")
        check(got == name, f"{name} run reports {got}")
        check(len(summary["losses"]) == STEPS, f"{name} run gave {len(summary['losses'])} losses")
        if name in results:
            again = max(abs(a - b) for a, b in zip(summary["losses"], results[name]["losses"]))
            check(again <= 1e-4, f"{name}'s runs' losses differ by {again:.2e}")
        results[name] = summary
        speeds.setdefault(name, []).append(summary["steps_per_s"])
        launches.setdefault(name, []).append(summary["launch_us"])

nat = results["native"]["losses"]
print(f"{'step':>4} " + " ".join(f"{name:>10}" for name, _ in CONFIGS))
for i in range(STEPS):
    print(f"{i + 1:4d} " + " ".join(f"{results[name]['losses'][i]:10.6f}" for name, _ in CONFIGS))
max_diff = max(abs(a - b) for name, _ in CONFIGS[1:] for a, b in zip(nat, results[name]["losses"]))
med = {name: statistics.median(v) for name, v in speeds.items()}
print(f"steps/s over {RUNS} runs each: " + "; ".join(
    f"{name} median {med[name]:.1f} ({min(v):.1f}-{max(v):.1f})" for name, v in speeds.items()))
ratios = {name: med[name] / med["native"] for name, _ in CONFIGS[1:]}
note(f"max loss diff {max_diff:.1e}; median steps/s of {RUNS}: native {med['native']:.1f}, "
     + ", ".join(f"{n} {med[n]:.1f} ({r:.2f}x)" for n, r in ratios.items())
     + "; launch us " + ", ".join(f"{n} {statistics.median(v):.1f}" for n, v in launches.items())
     + f"; peak reserved MiB tessera {results['adaptor']['peak_reserved_mib']} native {results['native']['peak_reserved_mib']}")
check(nat[-1] < nat[0] - 0.2, f"native loss did not fall ({nat[0]:.3f} -> {nat[-1]:.3f}): a useless workload")
check(max_diff <= 1e-4, f"losses differ by {max_diff:.2e} > 1e-4")
for name, r in ratios.items():
    check(r >= 0.8, f"tessera ({name}) runs at {r:.2f}x native speed (< 0.8x)")
print("TRAIN PARITY OK")
