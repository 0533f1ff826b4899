#!/usr/bin/env bash
# Every GPU figure the issues ask for, one command each; run from the repository root on a GPU machine:
#
#   bash benchmarks/gpu.sh [OUT_DIR] [FIGURE ...]      (default: every figure, into runs/gpu)
#
# FIGURE: throughput augment data classifier curve. Each writes OUT_DIR/<figure>.json (the curve: a run
# directory with metrics.jsonl and report.md). Fashion-MNIST is read from data.root=$FMNIST
# (default /usr/share/datasets/fashion-mnist; copy the four .gz files there or set FMNIST).
# Offline machines: put wheels of the missing packages in $WHEELS (default benchmarks/wheels) first.
set -euo pipefail
OUT=${1:-runs/gpu}; shift || true
FIGURES=${*:-throughput augment data classifier curve}
PY=${PYTHON:-python}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
WHEELS=${WHEELS:-benchmarks/wheels}
mkdir -p "$OUT"
if ! $PY -c "import omegaconf, tqdm, safetensors, sklearn, matplotlib, tensorboard" 2>/dev/null; then
  $PY -m pip install -q --no-index --find-links "$WHEELS" omegaconf tqdm safetensors scikit-learn matplotlib tensorboard
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

for f in $FIGURES; do case $f in
  # SimCLR, ResNet-18 CIFAR stem, 32x32, batch 512: synthetic views on the device vs the real Fashion-MNIST
  # pipeline (target >= 25,000 views/s, pipeline within 10% of synthetic)
  throughput) $PY -m selfsup bench throughput --preset simclr-fmnist --image-size 32 --batch 512 \
      --overrides data.root="$FMNIST" --steps 50 --warmup 10 --out "$OUT/throughput.json"
    $PY -m selfsup bench throughput --preset simclr-fmnist --image-size 32 --batch 512 --compile \
      --overrides data.root="$FMNIST" --steps 50 --warmup 20 --out "$OUT/throughput-compile.json" ;;
  # batched augmentation vs torchvision per image in DataLoader workers, 32/96/224
  augment) $PY -m selfsup bench augment --sizes 32 96 224 --batch 512 --workers 0 4 8 16 \
      --out "$OUT/augment.json" ;;
  # image readers at 224 with the SimCLR augmentation: folder, zip, cached zip; PIL in workers vs nvJPEG
  data) $PY -m selfsup bench data --workers 0 4 8 16 --batch 256 --out "$OUT/data.json" ;;
  # classifier head N = 1e6, D = 128, batch 1024, full softmax, against the roofline bound (target ratio <= 2)
  classifier) $PY -m selfsup bench classifier --device cuda --ns 10000 100000 1000000 \
      --out "$OUT/classifier.json" ;;
  # Fashion-MNIST, ResNet-18, SimCLR: kNN top-1 against wall time (report.md: time to first reach 0.90)
  curve) rm -rf "$OUT/curve"
    $PY -m selfsup train simclr-fmnist data.root="$FMNIST" eval.every=1 train.epochs=100 run_dir="$OUT/curve"
    $PY -m selfsup report --run "$OUT/curve" ;;
  *) echo "unknown figure $f (throughput augment data classifier curve)"; exit 2 ;;
esac; done
