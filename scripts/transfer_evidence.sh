#!/usr/bin/env bash
# Reproduces the transfer-learning evidence of README ("Evidence: does transfer help") on synthetic data, on CPU.
#
#   scripts/transfer_evidence.sh [DIR]    # default DIR: runs/evidence; about 3 minutes on 2 cores
#
# 1. Pretrains a small Wide ResNet (WRN-10-1) on the `source` stripes task
#    (1,000 images, 5 orientations) and exports its backbone (--export_backbone).
# 2. On the `target` task (5 other orientations, 25 training images) trains
#    from scratch, with the exported backbone frozen, and fine-tuned.
# 3. Compares the three: DIR/runs/report/{curves.png,loss.png,report.md,report.csv}.
# Reruns skip finished runs. PYTHON picks the interpreter.
set -euo pipefail

dir="${1:-runs/evidence}"
PYTHON="${PYTHON:-python3}"
here="$(cd "$(dirname "$0")" && pwd)"

[[ -d "$dir/data/source" ]] || "$PYTHON" "$here/make_stripes_task.py" --task=source \
  --examples_per_class=200 --out="$dir/data/source"
[[ -d "$dir/data/target" ]] || "$PYTHON" "$here/make_stripes_task.py" --task=target \
  --examples_per_class=40 --out="$dir/data/target"

wrn=(--backbone=wide_resnet --wrn_depth=10 --wrn_width=1)
"$PYTHON" -m trainer.main --workdir="$dir/pretrain" --image_dir="$dir/data/source" \
  --val_fraction=0.2 --image_size=32 --batch_size=32 --epochs=6 --learning_rate=2e-3 \
  --early_stopping_patience=0 --noexport --export_backbone "${wrn[@]}"

# 40 images per class, 12.5% of them for training: 25 training images in all.
target=(--image_dir="$dir/data/target" --val_fraction=0.875 --image_size=32 --batch_size=5
        --epochs=20 --early_stopping_patience=0 --noexport)
backbone="$dir/pretrain/export_backbone"
"$PYTHON" -m trainer.main --workdir="$dir/runs/scratch" "${target[@]}" "${wrn[@]}" \
  --learning_rate=2e-3
"$PYTHON" -m trainer.main --workdir="$dir/runs/transfer" "${target[@]}" --backbone=hub \
  --hub_handle="$backbone" --notrainable --learning_rate=1e-2
"$PYTHON" -m trainer.main --workdir="$dir/runs/finetune" "${target[@]}" --backbone=hub \
  --hub_handle="$backbone" --trainable --learning_rate=1e-3

"$PYTHON" -m trainer.compare "$dir/runs"
