"""Memory visualisation: tessera's snapshot in PyTorch's tools.

With tessera, record the history, train a few steps, take snapshot() and pickle it, then
run PyTorch's own viewer on it as users do:
  python -m torch.cuda._memory_viz trace_plot snap.pickle -o trace.html
  python -m torch.cuda._memory_viz segment_plot snap.pickle -o segments.html
  python -m torch.cuda._memory_viz stats snap.pickle      (segsum: checks the totals add up)
  python -m torch.cuda._memory_viz trace snap.pickle
The HTML pages embed the pickled snapshot: it is decoded back and must hold the segments at
their addresses. Then the history trace is dumped and replayed with tessera-replay (when
built): it must report as many events, and the same peak live bytes as tessera measured.
Set TESSERA_VIZ_DIR to keep the files.
"""

import argparse
import base64
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile

from gpu_util import REPO, check, install, note, settle

import train_gpt  # noqa: E402  (examples/, on sys.path through gpu_util)

torch, tt = install()
tt.record_memory_history(True, max_entries=1_000_000)  # before the first allocation

args = argparse.Namespace(vocab=1024, d_model=256, layers=2, heads=4, max_len=128, seed=0)
torch.manual_seed(0)
dev = torch.device("cuda")
model = train_gpt.build_model(torch, args).to(dev)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
gen = torch.Generator().manual_seed(0)
for _ in range(3):
    x, y = train_gpt.make_batch(torch, gen, args)
    x, y = x.to(dev), y.to(dev)
    loss = torch.nn.functional.cross_entropy(model(x).view(-1, args.vocab), y.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    loss.item()
del x, y, loss
settle(torch)

out_dir = os.environ.get("TESSERA_VIZ_DIR") or tempfile.mkdtemp(prefix="tessera_viz_")
os.makedirs(out_dir, exist_ok=True)
snap_path = os.path.join(out_dir, "snap.pickle")
snap = tt.dump_snapshot(snap_path)
segments = [s for s in snap["segments"] if s["device"] == 0]
events = snap["device_traces"][0]
actions = {}
for e in events:
    actions[e["action"]] = actions.get(e["action"], 0) + 1
print(f"snapshot: {len(segments)} segments, {sum(len(s['blocks']) for s in segments)} blocks, "
      f"{len(events)} trace events {actions}")
check(segments, "snapshot has no segment")
check(actions.get("alloc", 0) > 50 and actions.get("segment_map", 0) > 0, f"trace too thin: {actions}")
param = next(model.parameters())
owner = [s for s in segments if s["address"] <= param.data_ptr() < s["address"] + s["total_size"]]
check(len(owner) == 1, f"parameter at {param.data_ptr():#x} lies in {len(owner)} segments")
check(any(b["state"] == "active_allocated" and b["address"] <= param.data_ptr() < b["address"] + b["size"]
          for b in owner[0]["blocks"]), "the parameter's block is not active_allocated")


def viz(*cmd_args):
    cmd = [sys.executable, "-m", "torch.cuda._memory_viz", *cmd_args]
    proc = subprocess.run(cmd, cwd=out_dir, capture_output=True, text=True, timeout=120)
    print(f"$ {' '.join(cmd[1:])}: rc {proc.returncode}, {len(proc.stdout)} chars out")
    check(proc.returncode == 0, f"{' '.join(cmd_args)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def embedded_snapshot(html_path):
    """The snapshot that an HTML page of _memory_viz carries (base64 of the pickle)."""
    html = open(html_path).read()
    m = re.search(r'"base64":\s*"([A-Za-z0-9+/=]+)"', html)
    check(m, f"{html_path}: no embedded snapshot")
    return pickle.loads(base64.b64decode(m.group(1)))  # the NUL padding after STOP is ignored


sizes = {}
for kind, extra in (("trace_plot", []), ("segment_plot", []), ("trace_plot_segments", ["-s"])):
    path = os.path.join(out_dir, f"{kind}.html")
    viz(kind.replace("_segments", ""), snap_path, "-o", path, *extra)
    check(os.path.isfile(path), f"{path} not written")
    sizes[kind] = os.path.getsize(path)
    check(sizes[kind] > 10_000, f"{kind}: only {sizes[kind]} bytes")
    inner = embedded_snapshot(path)
    addresses = {s["address"] for s in inner["segments"]}
    check(owner[0]["address"] in addresses, f"{kind}: segment {owner[0]['address']:#x} not in the page")
    check(len(inner["device_traces"][0]) == len(events), f"{kind}: trace events lost")
print("html sizes:", sizes)

# In process too (what notebooks call).
from torch.cuda import _memory_viz  # noqa: E402

check(len(_memory_viz.segment_plot(snap)) > 10_000 and len(_memory_viz.trace_plot(snap)) > 10_000,
      "in-process plots too small")
summary = viz("stats", snap_path)  # segsum asserts that free + allocated add up to each segment
print("\n".join(summary.splitlines()[-12:]))
check("total_reserved" in summary, "segsum printed no totals")
trace_text = viz("trace", snap_path)
check("del " in trace_text and "TOTAL MEM" in trace_text, "trace printed no allocation or free")

# The history as a trace file, replayed on the simulated device.
trace_path = os.path.join(out_dir, "history.trace")
n_events = tt.dump_history_trace(trace_path)
s = tt.stats()
print(f"history trace: {n_events} events, tessera peak allocated {s['allocated_bytes']['peak']} B")
check(n_events == actions.get("alloc", 0) + actions.get("free_requested", 0),
      "history trace and snapshot disagree on the number of allocs and frees")
replay_bin = os.path.join(REPO, "target", "release", "tessera-replay")
replayed = "no tessera-replay binary"
if os.path.isfile(replay_bin):
    proc = subprocess.run([replay_bin, trace_path], capture_output=True, text=True, timeout=120)
    print(proc.stdout.strip(), proc.stderr.strip()[-2000:])
    check(proc.returncode == 0, f"tessera-replay exited {proc.returncode}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    check(report["events"] == n_events, f"replay read {report['events']} events, wrote {n_events}")
    check(report["peak_live_bytes"] == s["allocated_bytes"]["peak"],
          f"replay peak live {report['peak_live_bytes']} != tessera peak allocated {s['allocated_bytes']['peak']}")
    replayed = f"replayed {report['events']} events, peak live = tessera's peak"
note(f"{len(segments)} segments, {len(events)} events; html {sizes['trace_plot'] // 1024}/"
     f"{sizes['segment_plot'] // 1024} KiB; {replayed}")
print("VIZ OK")
