"""install() where the torch adaptor cannot be built: with no C++ compiler or ninja on PATH and
no cached build, tessera installs as a plain plug-in, says so in exactly one line on stderr,
and allocates; with no compiler but the adaptor cached (run.sh builds it first), it installs
through the adaptor and says nothing. Each case in its own process."""

import json
import os
import subprocess
import sys
import tempfile

from gpu_util import PYTHON_PATHS, REPO, check, last_json, note

CHILD = r"""
import json, tessera
path = tessera.install()
import torch
x = torch.ones(1 << 20, device="cuda")
y = (x * 2).sum().item()
print(json.dumps({"path": path, "sum": y, "allocated": tessera.stats()["allocated_bytes"]["current"],
                  "torch_stats": path == "adaptor" and torch.cuda.memory_allocated() > 0}))
"""


def run(env_changes):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(PYTHON_PATHS), **env_changes)
    env.pop("CXX", None)
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    check(proc.returncode == 0, f"the child exited {proc.returncode}")
    out = last_json(proc.stdout)
    check(out is not None and out["sum"] == 2 * (1 << 20) and out["allocated"] >= 4 << 20,
          f"the child did not allocate and compute: {out}")
    return out, [line for line in proc.stderr.splitlines() if line.strip()]


with tempfile.TemporaryDirectory() as empty_bin, tempfile.TemporaryDirectory() as fresh_cache:
    no_tools = {"PATH": empty_bin}  # no c++, no ninja
    out, err = run(dict(no_tools, TORCH_EXTENSIONS_DIR=fresh_cache))
    check(out["path"] == "plug-in", f"installed as {out['path']} with no compiler and no cache")
    check(len(err) == 1, f"{len(err)} lines on stderr, not one: {err}")
    check(err[0].startswith("tessera: installed as a plain plug-in") and "no C++ compiler" in err[0]
          and "torch.cuda.memory_stats()" in err[0], f"the line does not say why and what: {err[0]}")
    print(f"fallback line ({len(err[0])} chars): {err[0]}")

    out, err = run(no_tools)  # the default cache, which run.sh filled
    check(out["path"] == "adaptor" and out["torch_stats"], f"with the adaptor cached: {out}")
    check(not err, f"a cached adaptor printed: {err}")
note("no compiler, no cache: plug-in and one line on stderr; no compiler, cached build: adaptor, silent")
print(json.dumps({"ok": True}))
