"""Shutdown: a process that exits with live tensors (globals, reference cycles,
tensors used on a side stream with record_stream, a status thread running, and
again with the driver thread running too, just woken by a miss) exits 0,
without a hang and without an error printed. Each case is a child."""
import subprocess
import sys

from gpu_util import REPO, check, note

CHILD = r'''
import gc, os, sys
sys.path.insert(0, os.path.join(%(repo)r, "python"))
import tessera_torch
tessera_torch.install(conf=%(conf)r)
import torch
keep = [torch.randn(1 << 20, device="cuda") for _ in range(8)]
class Cycle:
    pass
c = Cycle(); c.self = c; c.t = torch.ones(1 << 22, device="cuda")
s = torch.cuda.Stream()
with torch.cuda.stream(s):
    x = torch.ones(1 << 22, device="cuda") * 2
x.record_stream(torch.cuda.current_stream())
big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
%(ending)s
'''
ENDINGS = {
    "plain": "pass",
    "sys_exit": "sys.exit(0)",
    "after_empty_cache": "del big; torch.cuda.empty_cache()",
    "os_exit": "os._exit(0)",
}
CONFS = {"": "status_interval:1", "+driver_thread": "status_interval:1,driver_thread:true"}
bad = []
for (suffix, conf), (name, ending) in [(c, e) for c in CONFS.items() for e in ENDINGS.items()]:
    name += suffix
    code = CHILD % {"repo": REPO, "ending": ending, "conf": conf}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    err_lines = [l for l in p.stderr.splitlines() if l.strip() and not l.startswith("tessera: dev")]
    print(f"{name}: rc {p.returncode}; stderr lines {len(err_lines)}")
    for l in err_lines[:10]:
        print("   ", l)
    if p.returncode != 0 or err_lines:
        bad.append(name)
check(not bad, f"unclean exits: {bad}")
note(f"{len(ENDINGS)} ways to exit with live tensors, with and without the driver thread: rc 0, nothing printed")
