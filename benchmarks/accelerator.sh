#!/usr/bin/env bash
# The accelerator checks in one call: training images/s of the article's U-Net at batch 128 and
# 1024, of Ho et al.'s CIFAR-10 U-Net (configs/cifar10.py, 35.7M parameters, batch 128) in float32
# and bfloat16, and 10,000 samples x 1000 steps, with peak device memory. Run from the repository
# root in an environment with `pip install -e ".[cuda]"`; JSON files go to ${OUT:-bench-out}/.
#
#   bash benchmarks/accelerator.sh            # the article's runs took about 3 minutes on one H100
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
# CIFAR-10 (synthetic 32x32x3 data: throughput does not depend on the pixels), flips included.
for dtype in float32 bfloat16; do
  python benchmarks/train_throughput.py --config configs/cifar10.py --config.model.dtype=$dtype \
    --config.train.steps_per_chunk=50 --num_examples 50000 --steps 300 --json "$out/train_cifar10_b128_$dtype.json"
done
python - "$out" <<'EOF'
import json, sys
for dtype in ("float32", "bfloat16"):
    r = json.load(open(f"{sys.argv[1]}/train_cifar10_b128_{dtype}.json"))
    print(f"CIFAR-10 U-Net, batch 128, {dtype}: {r['steps_per_s']} steps/s, {r['images_per_s']:,.0f} images/s, "
          f"peak device memory {r['device_peak_mib']} MiB on {r['device_kind']}")
print("Ho et al. (2020), TPU v3-8: 21 steps/s at batch 128, about 2,700 images/s")
EOF
# Sampling: all 10,000 in one batch, the article's 1000 steps, in one fori_loop.
python benchmarks/sample_throughput.py --config configs/fashion.py --num 10000 --repeats 2 \
  --json "$out/sample_article_10000x1000.json"
