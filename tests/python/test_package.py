"""The Python package from a clone: `pip install .` into a fresh virtual environment, and a
wheel built once that installs into a second one whose PATH has no cargo; both import
`tessera` (and its former name `tessera_torch`) and allocate through the bundled library."""

import os
import subprocess
import sys

from test_tessera_torch import REPO

# Runs in a fresh interpreter of the environment: the bundled library, not the repository's.
CHECK = """
import tessera, tessera_torch
assert tessera_torch is tessera
path = tessera.find_library()
assert 'site-packages' in path and path.endswith('.so'), path
tessera.configure('backend:host,page_size:64K')
p = tessera.load().tessera_try_malloc(4096, 0, None)
assert p and tessera.stats()['allocated_bytes']['current'] == 4096, tessera.last_error()
print('PACKAGE OK', tessera.version())
"""


def venv(where):
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
    return where / "bin" / "python"


def run(cmd, env=None, timeout=900):
    env = {k: v for k, v in (env or os.environ).items() if k not in ("TESSERA_LIB", "TESSERA_CONF", "PYTHONPATH")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd="/")
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_pip_install_from_a_clone_then_a_wheel_without_rust(tmp_path):
    python = venv(tmp_path / "a")
    run([str(python), "-m", "pip", "install", "-q", str(REPO)])
    assert "PACKAGE OK 0.1.0" in run([str(python), "-c", CHECK])
    dist = tmp_path / "dist"
    run([str(python), "-m", "pip", "wheel", "-q", "--no-deps", str(REPO), "-w", str(dist)])
    (wheel,) = dist.glob("tessera-*.whl")
    assert "abi3" in wheel.name, wheel.name  # one wheel for every CPython from 3.9
    other = venv(tmp_path / "b")
    bare = dict(os.environ, PATH="/usr/bin:/bin")
    assert subprocess.run(["which", "cargo"], env=bare, capture_output=True).returncode != 0, "cargo on the bare PATH"
    run([str(other), "-m", "pip", "install", "-q", "--no-index", str(wheel)], env=bare)
    assert "PACKAGE OK 0.1.0" in run([str(other), "-c", CHECK], env=bare)
