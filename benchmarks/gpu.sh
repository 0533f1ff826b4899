#!/usr/bin/env bash
# Every GPU figure the issues ask for, one command each. Run from the repository root on the GPU machine,
# with the Python that already holds torch (no venv, no torch install):
#
#   bash benchmarks/gpu.sh [--out DIR] [--bundle DIR] [--epochs N] [--minutes M] [--check] [FIGURE ...]
#
# FIGURE: throughput augment data classifier curve methods (default: all but methods). Each writes
# DIR/<figure>.json (curve: a run directory DIR/curve with metrics.jsonl and report.md; methods: the folder
# DIR/methods of `selfsup bench methods`). Default DIR: runs/gpu.
# --bundle DIR: what `make gpu-bundle` gathered on a networked machine (default bundle/gpu): wheels/ of the
#   pure-Python packages the machine lacks, installed into DIR/site with pip --no-index, and
#   fashion-mnist/ (used when $FMNIST is unset and /usr/share/datasets/fashion-mnist is absent).
# --epochs N: epochs of the kNN curve (default 100; warm-up: a tenth of them).
# --minutes M: training budget of each GPU preset in `methods` (default 10; 6 presets: M x 6 minutes and more).
# --check: parse, install, print the plan, run nothing (needs no GPU).
# PYTHON (default python3) picks the interpreter; SELFSUP_GPU_EXTRA="module=package ..." adds requirements.
set -euo pipefail
usage() { sed -n 2,16p "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu.sh: error: $*" >&2; exit 2; }
OUT=runs/gpu BUNDLE=bundle/gpu EPOCHS=100 MINUTES=10 CHECK=0 FIGURES=()
while [ $# -gt 0 ]; do
  case $1 in --out|--bundle|--epochs|--minutes) [ -n "${2:-}" ] || die "$1 needs a value (see --help)" ;; esac
  case $1 in
  --out) OUT=$2; shift 2 ;;
  --bundle) BUNDLE=$2; shift 2 ;;
  --epochs) EPOCHS=$2; shift 2
    [[ $EPOCHS =~ ^[1-9][0-9]*$ ]] || die "--epochs must be a positive integer, got '$EPOCHS'" ;;
  --minutes) MINUTES=$2; shift 2
    [[ $MINUTES =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--minutes must be a positive number, got '$MINUTES'" ;;
  --check) CHECK=1; shift ;;
  -h|--help) usage; exit 0 ;;
  throughput|augment|data|classifier|curve|methods) FIGURES+=("$1"); shift ;;
  *) die "unknown argument '$1' (figures: throughput augment data classifier curve methods; see --help)" ;;
esac; done
[ ${#FIGURES[@]} -gt 0 ] || FIGURES=(throughput augment data classifier curve)
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || die "no Python '$PY'; set PYTHON to the interpreter that holds torch"
$PY -c "import torch, torchvision" 2>/dev/null || die "'$PY' has no torch/torchvision; set PYTHON to the one that does"

# Requirements as module=package; only the missing ones are installed, from the bundle, without the network.
SITE=$OUT/site
export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}
missing=($($PY - omegaconf=omegaconf yaml=pyyaml tqdm=tqdm safetensors=safetensors sklearn=scikit-learn \
    matplotlib=matplotlib tensorboard=tensorboard PIL=pillow ${SELFSUP_GPU_EXTRA:-} <<'PY'
import importlib.util, sys
print(" ".join(p.split("=", 1)[1] for p in sys.argv[1:] if importlib.util.find_spec(p.split("=", 1)[0]) is None))
PY
))
if [ ${#missing[@]} -gt 0 ]; then
  [ -d "$BUNDLE/wheels" ] || die "missing ${missing[*]} and no wheels in $BUNDLE/wheels: run 'make gpu-bundle' on a networked machine and carry $BUNDLE"
  echo "installing from $BUNDLE/wheels into $SITE: ${missing[*]}"
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --disable-pip-version-check --find-links "$BUNDLE/wheels" \
    --target "$SITE" "${missing[@]}" || die "could not install ${missing[*]} from $BUNDLE/wheels: rerun 'make gpu-bundle'"
fi
$PY -c "import omegaconf, selfsup.cli" || die "selfsup does not import with $PY"

if [ -z "${FMNIST:-}" ]; then
  FMNIST=/usr/share/datasets/fashion-mnist
  [ -f "$FMNIST/train-images-idx3-ubyte.gz" ] || FMNIST=$BUNDLE/fashion-mnist
fi
needs_fmnist=0
for f in "${FIGURES[@]}"; do [[ $f == throughput || $f == curve || $f == methods ]] && needs_fmnist=1; done
if [ $needs_fmnist = 1 ] && [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  die "no Fashion-MNIST in $FMNIST: set FMNIST=DIR (the four .gz files) or run 'make gpu-bundle' and carry $BUNDLE"
fi
echo "python: $($PY -c 'import sys, torch; print(sys.executable, "torch", torch.__version__)')"
echo "figures: ${FIGURES[*]} -> $OUT; Fashion-MNIST: $FMNIST; curve epochs: $EPOCHS; methods: $MINUTES min each"
[ $CHECK = 1 ] && { echo "check: ready"; exit 0; }
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print('gpu:', torch.cuda.get_device_name(0))"
mkdir -p "$OUT"

for f in "${FIGURES[@]}"; do echo "== $f ($(date +%T))"; case $f in
  # SimCLR, ResNet-18 CIFAR stem, 32x32, batch 512: synthetic views on the device vs the real Fashion-MNIST
  # pipeline (target >= 25,000 views/s, pipeline within 10% of synthetic); then with torch.compile
  throughput) $PY -m selfsup bench throughput --preset simclr-fmnist --image-size 32 --batch 512 \
      --overrides data.root="$FMNIST" --steps 50 --warmup 10 --out "$OUT/throughput.json"
    $PY -m selfsup bench throughput --preset simclr-fmnist --image-size 32 --batch 512 --compile \
      --overrides data.root="$FMNIST" --steps 50 --warmup 20 --out "$OUT/throughput-compile.json" ;;
  # batched augmentation vs torchvision per image in DataLoader workers, 32/96/224
  augment) $PY -m selfsup bench augment --device cuda --sizes 32 96 224 --batch 512 --workers 0 4 8 16 \
      --out "$OUT/augment.json" ;;
  # image readers at 224 with the SimCLR augmentation: folder, zip, cached zip; PIL in workers vs nvJPEG
  data) $PY -m selfsup bench data --workers 0 4 8 16 --batch 256 --out "$OUT/data.json" ;;
  # classifier head, fused step and reference, N = 1e4 .. 1e7, D = 128, batch 1024, full softmax and sampled
  # negatives, against the roofline bound (issue 25's target: N = 1e6 full within 3x of its bound)
  classifier) $PY -m selfsup bench classifier --device cuda --ns 10000 100000 1000000 10000000 \
      --out "$OUT/classifier.json" ;;
  # Fashion-MNIST, ResNet-18, SimCLR: kNN top-1 against wall time (report.md: time to first reach 0.90)
  curve) rm -rf "$OUT/curve"
    $PY -m selfsup train simclr-fmnist data.root="$FMNIST" eval.every=1 train.epochs="$EPOCHS" \
      train.warmup_epochs=$(( EPOCHS >= 10 ? EPOCHS / 10 : 1 )) run_dir="$OUT/curve"
    $PY -m selfsup report --run "$OUT/curve" ;;
  # the GPU presets (derived from the CPU study, unmeasured until this runs): time to accuracy, M minutes each
  methods) rm -rf "$OUT/methods"
    $PY -m selfsup bench methods --minutes "$MINUTES" --out "$OUT/methods" data.root="$FMNIST" \
      --presets simclr-fmnist,mocov2-fmnist,instdisc-fmnist,pic-fmnist,millionway-fmnist,mocov3-vit-fmnist ;;
esac; done
