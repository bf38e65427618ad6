#!/usr/bin/env bash
# The test suite that needs no GPU: Rust unit, integration and property tests
# (sim and host backends, the C and C++ programs), then the Python module's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release
cargo build --release --quiet   # the .so the Python tests load
python3 -m pytest -q tests/python
