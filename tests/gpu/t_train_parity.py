"""Training parity: train_gpt.py with the native allocator and with tessera, same seed.

Losses must agree to 1e-4 (the allocator must not change any result); tessera's speed
is reported, and fails the test only under 0.8x native. The runs alternate (native,
tessera, native, tessera) and each allocator's best steps/s counts: single runs of this
small model swing by 1.5x on their own (native 44-70 steps/s in one minute on an H100).
"""

import sys

from gpu_util import check, note, run_json

STEPS = 30
results = {}
for _ in range(2):
    for name, extra in (("native", ["--native"]), ("tessera", [])):
        cmd = [sys.executable, "examples/train_gpt.py", "--steps", str(STEPS), "--seed", "1234"] + extra
        summary, proc = run_json(cmd, timeout=110)
        check(proc.returncode == 0, f"{name} run exited {proc.returncode}")
        check(summary.get("allocator") == name, f"{name} run reports allocator {summary.get('allocator')}")
        check(len(summary["losses"]) == STEPS, f"{name} run gave {len(summary['losses'])} losses")
        if name in results:
            again = max(abs(a - b) for a, b in zip(summary["losses"], results[name]["losses"]))
            check(again <= 1e-4, f"{name}'s two runs' losses differ by {again:.2e}")
            summary["steps_per_s"] = max(summary["steps_per_s"], results[name]["steps_per_s"])
        results[name] = summary

nat, tes = results["native"]["losses"], results["tessera"]["losses"]
print(f"{'step':>4} {'native':>10} {'tessera':>10} {'diff':>9}")
for i, (a, b) in enumerate(zip(nat, tes), 1):
    print(f"{i:4d} {a:10.6f} {b:10.6f} {abs(a - b):9.2e}")
max_diff = max(abs(a - b) for a, b in zip(nat, tes))
ratio = results["tessera"]["steps_per_s"] / results["native"]["steps_per_s"]
summary = (f"max loss diff {max_diff:.1e}; best steps/s of 2 tessera {results['tessera']['steps_per_s']:.1f} "
           f"native {results['native']['steps_per_s']:.1f} ({ratio:.2f}x); peak reserved MiB "
           f"tessera {results['tessera']['peak_reserved_mib']} native {results['native']['peak_reserved_mib']}")
note(summary)
check(nat[-1] < nat[0] - 0.2, f"native loss did not fall ({nat[0]:.3f} -> {nat[-1]:.3f}): a useless workload")
check(max_diff <= 1e-4, f"losses differ by {max_diff:.2e} > 1e-4")
check(ratio >= 0.8, f"tessera runs at {ratio:.2f}x native speed (< 0.8x)")
print("TRAIN PARITY OK")
