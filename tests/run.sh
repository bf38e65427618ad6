#!/usr/bin/env bash
# The test suite that needs no GPU: Rust unit, integration and property tests
# (sim and host backends, the C and C++ programs), then the Python module's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest --version >/dev/null 2>&1 || python3 -m pip install --quiet pytest
cargo build --release           # the .so that the C, C++ and Python tests load
cargo test --release
python3 -m pytest -q tests/python
