#!/usr/bin/env bash
# The accelerator check in one call: training images/s of the article's U-Net at batch 128,
# and 10,000 samples x 1000 steps, with peak device memory. Run from the repository root in an
# environment with `pip install -e ".[cuda]"`; JSON files go to ${OUT:-bench-out}/.
#
#   bash benchmarks/accelerator.sh            # about 3 minutes on one H100
set -euo pipefail
out="${OUT:-bench-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python -c "import jax; print(jax.devices())"
# Training: scanned chunks (one dispatch each) within an epoch (58 steps at batch 1024), >= 3 timed chunks.
python benchmarks/train_throughput.py --config configs/fashion.py --config.train.steps_per_chunk=100 \
  --steps 300 --json "$out/train_article_b128.json"
python benchmarks/train_throughput.py --config configs/fashion.py --config.train.steps_per_chunk=50 \
  --config.train.batch_size=1024 --steps 150 --json "$out/train_article_b1024.json"
# Sampling: all 10,000 in one batch, the article's 1000 steps, in one fori_loop.
python benchmarks/sample_throughput.py --config configs/fashion.py --num 10000 --repeats 2 \
  --json "$out/sample_article_10000x1000.json"
