#!/usr/bin/env bash
# Runs the six reference experiments (docs/reference.md), one sub-directory of --workdir each.
#
#   scripts/run_experiments.sh --workdir=runs/flowers [extra trainer flags...]
#   scripts/run_experiments.sh --workdir=runs/flowers --image_dir=flower_photos
#   scripts/run_experiments.sh --workdir=runs/t --presets=a=smoke,b=smoke --epochs=1
#
# --presets=LIST  comma-separated NAME or NAME=EXPERIMENT items (default: the six);
#                 NAME is the run's sub-directory, EXPERIMENT a trainer preset.
# Every other flag goes to each run of `python -m trainer.main` (PYTHON picks
# the interpreter). The runs share one file cache of the decoded images in
# <workdir>/cache (they read the same images at the same size, so only the first
# decodes them); pass --cache=... to choose otherwise (--cache=auto: each run
# its own). A run with summary.json is complete and skipped; any other
# run is (re)started and the trainer resumes it from its last epoch (one that
# never finished an epoch starts afresh, so its flags may change). A failed run
# does not stop the others; the exit code is 1 if any failed.
# Then compare them: python -m trainer.compare <workdir>
set -u

PRESETS="resnet50_scratch,resnet50_imagenet_finetune,resnet50_hub_transfer,resnet50_hub_finetune,bit_transfer,bit_finetune"
PYTHON="${PYTHON:-python3}"
workdir=""
cache_given=""
extra=()
while (($#)); do
  case "$1" in
    --workdir=*) workdir="${1#--workdir=}" ;;
    --workdir) workdir="${2:-}"; shift ;;
    --presets=*) PRESETS="${1#--presets=}" ;;
    --presets) PRESETS="${2:-}"; shift ;;
    --experiment|--experiment=*)
      echo "error: --experiment is chosen per run; use --presets=NAME=EXPERIMENT,..." >&2
      exit 2 ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --cache|--cache=*) cache_given=1; extra+=("$1") ;;
    *) extra+=("$1") ;;
  esac
  shift
done
if [[ -z "$workdir" ]]; then
  echo "error: --workdir=DIR is required (each preset runs in DIR/<name>)." >&2
  exit 2
fi

if [[ -z "$cache_given" ]]; then
  extra=("--cache=$workdir/cache" ${extra[@]+"${extra[@]}"})
fi

IFS=, read -r -a items <<< "$PRESETS"
if ((${#items[@]} == 0)); then
  echo "error: --presets is empty." >&2
  exit 2
fi
for item in "${items[@]}"; do
  name="${item%%=*}"
  if [[ -z "$name" || "$name" == */* || -z "${item#*=}" ]]; then
    echo "error: --presets item '$item' must be NAME or NAME=EXPERIMENT." >&2
    exit 2
  fi
done

failed=()
for item in "${items[@]}"; do
  name="${item%%=*}"
  experiment="${item#*=}"
  run_dir="$workdir/$name"
  if [[ -f "$run_dir/summary.json" ]]; then
    echo "== $name: complete, skipped ($run_dir/summary.json)"
    continue
  fi
  if [[ -f "$run_dir/history.csv" ]]; then
    echo "== $name: resuming the interrupted run in $run_dir"
  fi
  echo "== $name: --experiment=$experiment --workdir=$run_dir ${extra[*]:-}"
  if "$PYTHON" -m trainer.main --experiment="$experiment" --workdir="$run_dir" \
      ${extra[@]+"${extra[@]}"}; then
    echo "== $name: done"
  else
    status=$?
    echo "== $name: FAILED (exit code $status)" >&2
    failed+=("$name")
  fi
done

if ((${#failed[@]})); then
  echo "== ${#failed[@]} of ${#items[@]} runs failed: ${failed[*]}" >&2
  exit 1
fi
echo "== all ${#items[@]} runs complete; compare them: $PYTHON -m trainer.compare $workdir"
