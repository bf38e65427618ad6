#!/usr/bin/env bash
# The main job: build tessera, then
# - with a GPU and PyTorch: train a small GPT with tessera as PyTorch's allocator
#   (examples/train_gpt.py) and print its statistics next to the loss;
# - without: replay a real PyTorch allocation trace (tests/data) on the simulated
#   device and print the report (peak live vs reserved, OOM frontier).
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release --quiet
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 &&
   python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "== GPU found: training with tessera (examples/train_gpt.py)"
  PYTHONPATH=python exec python3 examples/train_gpt.py --steps "${STEPS:-50}"
fi
echo "== no GPU here: replaying the PyTorch allocation traces of tests/data on the simulated device"
for trace in tests/data/*.trace.gz; do
  echo "-- $trace"
  ./target/release/tessera-replay "$trace" --frontier
done
