#!/usr/bin/env bash
# BatchNorm momentum on a small real dataset: scikit-learn's 1,797 8x8 digit scans.
#
#   pip install scikit-learn                 # for the data only; the trainer does not need it
#   scripts/digits_evidence.sh [DIR]         # default DIR: runs/digits; about 20 minutes on 2 cores
#
# Trains the native Wide ResNet (WRN-10-2) and Keras ResNet50 from scratch, each
# twice: 12 epochs of 19 steps (batch 64, 32 px), with Keras' BatchNorm momentum
# 0.99 and with the trainer's default for statistics learned from scratch, 0.9.
# Then compares the four: DIR/runs/report/{curves.png,loss.png,report.md,report.csv}.
# Reruns skip finished runs. PYTHON picks the interpreter.
set -euo pipefail

dir="${1:-runs/digits}"
PYTHON="${PYTHON:-python3}"
here="$(cd "$(dirname "$0")" && pwd)"

[[ -d "$dir/data" ]] || "$PYTHON" "$here/write_digits.py" "$dir/data"

common=(--image_dir="$dir/data" --val_fraction=0.3 --image_size=32 --batch_size=64 --epochs=12
        --early_stopping_patience=0 --noexport --precision=float32)
for model in "wide_resnet" "resnet50 --weights=none"; do
  backbone="${model%% *}"
  for momentum in 0.99 0.9; do
    # shellcheck disable=SC2086  # $model holds the backbone and its flags
    "$PYTHON" -m trainer.main --workdir="$dir/runs/${backbone}_momentum_$momentum" "${common[@]}" \
      --backbone=$model --batch_norm_momentum="$momentum"
  done
done

"$PYTHON" -m trainer.compare "$dir/runs"
