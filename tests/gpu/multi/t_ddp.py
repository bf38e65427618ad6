"""DDP under torchrun --nproc_per_node 2: tessera in each rank vs the native
allocator; the losses must agree (deterministic kernels, same data)."""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from gpu_util import REPO, check, note  # noqa: E402

res = {}
for name, extra in (("native", ["--native"]), ("tessera", [])):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           os.path.join(REPO, "tests/gpu/multi/ddp_train.py"), "--steps", "20"] + extra
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "python"), os.path.join(REPO, "examples")]))
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    sys.stdout.write(p.stdout[-3000:])
    sys.stderr.write(p.stderr[-3000:])
    check(p.returncode == 0, f"{name} torchrun exited {p.returncode}")
    line = [l for l in p.stdout.splitlines() if l.startswith("{")][-1]
    res[name] = json.loads(line)
n, t = res["native"]["losses"], res["tessera"]["losses"]
diff = max(abs(a - b) for a, b in zip(n, t))
print("native ", [round(x, 5) for x in n])
print("tessera", [round(x, 5) for x in t])
check(len(n) == len(t) == 20, "loss counts")
check(diff <= 1e-3, f"losses differ by {diff}")
check(res["tessera"].get("invalid_frees", 1) == 0, "invalid frees in rank 0")
note(f"DDP 2 ranks GPT-2 small 20 steps: max loss diff {diff:.1e}; peak reserved MiB tessera "
     f"{res['tessera']['peak_reserved_mib']:.0f} native {res['native']['peak_reserved_mib']:.0f}")
