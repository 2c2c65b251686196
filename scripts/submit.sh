#!/usr/bin/env bash
# Submits one training run (or TensorBoard) to the current kubectl context,
# or uploads a folder of your images to the data volume.
#
#   scripts/submit.sh gpu|tpu|multiworker|tensorboard --image=REGISTRY/IMAGE:TAG
#       [--name=RUN] [--gpus=N] [--workers=N] [--dry-run] [-- TRAINER_FLAGS...]
#   scripts/submit.sh upload --image=REGISTRY/IMAGE:TAG [--name=NAME] [--dry-run] DIR
#
#   --image    the image to run (REGISTRY/IMAGE:TAG or REGISTRY/IMAGE@sha256:DIGEST)
#   --name     the run's name: the Job's name and its workdir /runs/RUN on the
#              runs volume (default: bit-finetune-DATE-TIME). Submitting the
#              same name again, after `kubectl delete job RUN`, resumes that run.
#              upload: the folder's name on the data volume (default: DIR's)
#   --gpus     gpu and multiworker: GPUs per pod (default 1), all used by the run
#   --workers  multiworker only: the number of worker pods (default 2)
#   --dry-run  print the manifests instead of applying them
#   TRAINER_FLAGS are appended to the Job's trainer flags; a flag given twice
#   takes the last value, so these override the overlay's.
#   upload copies DIR (one sub-folder of images per class) to
#   /data/images/NAME through a short-lived pod, which it then deletes; train
#   on it with `scripts/submit.sh gpu --image=... -- --image_dir=/data/images/NAME`.
#
# It writes a kustomization that builds on k8s/overlays/MODE into a temporary
# directory and applies it with `kubectl apply -k`. KUBECTL names another
# kubectl binary.
set -euo pipefail

usage() {
  sed -n '4,21s/^# \{0,1\}//p' "$0" >&2
  exit "${1:-2}"
}

fail() {
  echo "submit.sh: error: $*" >&2
  exit 2
}

repo=$(cd "$(dirname "$0")/.." && pwd -P)
kubectl=${KUBECTL:-kubectl}

(($# > 0)) || usage
mode=$1
shift
case $mode in
  gpu | tpu | multiworker | tensorboard | upload) ;;
  -h | --help) usage 0 ;;
  *) fail "unknown mode '$mode': one of gpu, tpu, multiworker, tensorboard, upload." ;;
esac

image="" name="" gpus="" workers="" dry_run=false source_dir=""
while (($# > 0)); do
  case $1 in
    --image=*) image=${1#*=} ;;
    --name=*) name=${1#*=} ;;
    --gpus=*) gpus=${1#*=} ;;
    --workers=*) workers=${1#*=} ;;
    --dry-run) dry_run=true ;;
    -h | --help) usage 0 ;;
    --) shift && break ;;
    -*) fail "unknown option '$1' (trainer flags go after --)." ;;
    *)
      [[ $mode == upload && -z $source_dir ]] \
        || fail "unexpected argument '$1' (trainer flags go after --)."
      source_dir=$1
      ;;
  esac
  shift
done
trainer_flags=("$@")

[[ -n $image ]] || fail "--image=REGISTRY/IMAGE:TAG is required: the image you built and pushed."
# A tag or a digest, so that every retry of the run pulls the same image; a
# ':' before the last '/' belongs to a registry's port.
[[ $image == *@sha256:* || ${image##*/} == *:* ]] \
  || fail "--image=$image has no tag; give REGISTRY/IMAGE:TAG or REGISTRY/IMAGE@sha256:DIGEST."
[[ $image != *:latest ]] || fail "--image: give a fixed tag, not 'latest', so that retries run the same code."

if [[ -n $gpus ]]; then
  [[ $mode == gpu || $mode == multiworker ]] || fail "--gpus is for the gpu and multiworker modes."
  [[ $gpus =~ ^[1-9][0-9]*$ ]] || fail "--gpus=$gpus: give the number of GPUs per pod, a positive number."
fi

if [[ $mode == tensorboard ]]; then
  [[ -z $name && -z $workers && ${#trainer_flags[@]} -eq 0 ]] \
    || fail "tensorboard takes only --image and --dry-run."
elif [[ $mode == upload ]]; then
  [[ -z $workers && ${#trainer_flags[@]} -eq 0 ]] \
    || fail "upload takes only --image, --name, --dry-run and the folder."
  [[ -n $source_dir ]] || fail "upload: name the folder to copy (one sub-folder of images per class)."
  [[ -d $source_dir ]] || fail "upload: $source_dir is not a folder."
  # The trainer reads one sub-folder per class: catch the folder above or
  # below the right one before copying anything.
  classes=false
  for entry in "$source_dir"/*/; do [[ -d $entry ]] && classes=true && break; done
  $classes || fail "upload: $source_dir has no sub-folders; give the folder whose sub-folders are the classes."
  name=${name:-$(basename "$(cd "$source_dir" && pwd -P)")}
  [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$ ]] \
    || fail "--name=$name: the folder's name on the data volume; use letters, digits, '.', '_' and '-' (at most 100)."
  job=data-upload-$(date +%Y%m%d-%H%M%S)
else
  name=${name:-bit-finetune-$(date +%Y%m%d-%H%M%S)}
  # A Job's name becomes a label value and, with "-INDEX", each worker's
  # hostname: a DNS label of at most 63 characters.
  [[ $name =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ && ${#name} -le 50 ]] \
    || fail "--name=$name: use at most 50 lower-case letters, digits and '-', starting and ending with a letter or digit."
  if [[ -n $workers ]]; then
    [[ $mode == multiworker ]] || fail "--workers is for the multiworker mode."
    [[ $workers =~ ^[1-9][0-9]*$ ]] || fail "--workers=$workers: give a positive number."
  fi
fi

for flag in ${trainer_flags[@]+"${trainer_flags[@]}"}; do
  [[ $flag != *[[:cntrl:]]* ]] || fail "a trainer flag contains a control character: $flag"
done

# A JSON string (JSON is YAML), so that no flag needs YAML quoting.
json() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
# kustomize takes only relative paths to other kustomizations: climb from the
# temporary directory (its physical path) to / and descend to the overlay.
up=$(cd "$workdir" && pwd -P | sed 's|[^/][^/]*|..|g')
overlay=${up#/}$repo/k8s/overlays/$mode

{
  echo "apiVersion: kustomize.config.k8s.io/v1beta1"
  echo "kind: Kustomization"
  echo "resources:"
  echo "  - $(json "$overlay")"
  echo "patches:"
  # The image by a patch of the container, not an `images:` entry: that would
  # have to match whatever name k8s/components/common sets.
  case $mode in
    tensorboard) echo "  - target: {kind: Deployment, name: tensorboard}" ;;
    upload) echo "  - target: {kind: Job, name: data-upload}" ;;
    *) echo "  - target: {kind: Job, name: bit-finetune}" ;;
  esac
  echo "    patch: |-"
  echo "      - {op: replace, path: /spec/template/spec/containers/0/image, value: $(json "$image")}"
  if [[ $mode == upload ]]; then
    echo "      - {op: replace, path: /metadata/name, value: $(json "$job")}"
  elif [[ $mode != tensorboard ]]; then
    if [[ -n $gpus ]]; then
      # An extended resource: the request must equal the limit. "~1" is a
      # "/" in a JSON pointer.
      echo "  - target: {kind: Job, name: bit-finetune}"
      echo "    patch: |-"
      for bound in requests limits; do
        echo "      - {op: replace, path: /spec/template/spec/containers/0/resources/$bound/nvidia.com~1gpu, value: $gpus}"
      done
    fi
    if [[ -n $workers ]]; then
      # Three places must agree on the number of workers (indexed-job.yaml).
      echo "  - target: {kind: Job, name: bit-finetune}"
      echo "    patch: |-"
      echo "      - {op: replace, path: /spec/completions, value: $workers}"
      echo "      - {op: replace, path: /spec/parallelism, value: $workers}"
      echo "  - patch: |-"
      echo "      {\"apiVersion\": \"batch/v1\", \"kind\": \"Job\", \"metadata\": {\"name\": \"bit-finetune\"},"
      echo "       \"spec\": {\"template\": {\"spec\": {\"containers\": [{\"name\": \"trainer\","
      echo "        \"env\": [{\"name\": \"WORKER_REPLICAS\", \"value\": \"$workers\"}]}]}}}}"
    fi
    # Renaming comes last: the patches above find the Job by its old name.
    echo "  - target: {kind: Job, name: bit-finetune}"
    echo "    patch: |-"
    echo "      - {op: replace, path: /metadata/name, value: $(json "$name")}"
    for flag in ${trainer_flags[@]+"${trainer_flags[@]}"}; do
      echo "      - {op: add, path: /spec/template/spec/containers/0/args/-, value: $(json "$flag")}"
    done
  fi
} >"$workdir/kustomization.yaml"

if $dry_run; then
  "$kubectl" kustomize "$workdir"
  exit
fi
if [[ $mode == upload ]]; then
  # The upload pod lives only as long as this script: it is deleted however
  # the script ends (a failed apply and ^C included).
  trap 'rm -rf "$workdir"; "$kubectl" delete job "$job" --ignore-not-found >&2' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
fi
"$kubectl" apply -k "$workdir"

if [[ $mode == upload ]]; then
  dest=/data/images/$name
  echo "Waiting for the upload pod (the image's first pull on a node can take minutes)..." >&2
  if ! "$kubectl" wait --for=jsonpath='{.status.ready}'=1 "job/$job" --timeout=15m >&2; then
    "$kubectl" describe pods -l "batch.kubernetes.io/job-name=$job" >&2 || true
    fail "upload: the upload pod did not start (its events are above)."
  fi
  status=0
  "$kubectl" exec "job/$job" -- sh -c '[ ! -e "$1" ] || exit 17' sh "$dest" || status=$?
  ((status != 17)) || fail "upload: $dest is already on the data volume; choose another --name, or delete it first."
  ((status == 0)) || exit "$status"
  echo "Copying $source_dir to $dest on the data volume..." >&2
  # Into a hidden folder, renamed when complete, so that the trainer never
  # reads half a folder. -h copies what symbolic links point to;
  # COPYFILE_DISABLE keeps macOS tar from adding its ._ metadata files.
  COPYFILE_DISABLE=1 tar -ch -C "$source_dir" -f - . \
    | "$kubectl" exec -i "job/$job" -- sh -c \
      'rm -rf "$2" && mkdir -p "$2" && tar -xf - -C "$2" && [ ! -e "$1" ] && mv "$2" "$1"' \
      sh "$dest" "/data/images/.$name.partial"
  cat <<EOF

Copied $source_dir to $dest on the data volume. Train on it:
  $0 gpu --image=$image -- --image_dir=$dest
EOF
  exit 0
fi

if [[ $mode == tensorboard ]]; then
  cat <<EOF

TensorBoard shows every run on the runs volume:
  kubectl rollout status deployment/tensorboard
  kubectl port-forward service/tensorboard 6006:6006    # then open http://localhost:6006
EOF
  exit 0
fi

cat <<EOF

Submitted run '$name' (workdir /runs/$name on the runs volume).
  kubectl get job $name                  # status; 'kubectl describe job $name' for events
EOF
if [[ $mode == multiworker ]]; then
  cat <<EOF
  kubectl logs -f -l batch.kubernetes.io/job-name=$name,batch.kubernetes.io/job-completion-index=0   # the chief's log
  kubectl logs -f -l batch.kubernetes.io/job-name=$name --prefix --max-log-requests=${workers:-2}   # every worker's
EOF
else
  cat <<EOF
  kubectl logs -f job/$name              # follow the trainer's log
EOF
fi
cat <<EOF
Open TensorBoard:
  $0 tensorboard --image=$image   # once
  kubectl port-forward service/tensorboard 6006:6006    # then open http://localhost:6006
Resume after a failure: kubectl delete job $name, then submit again with --name=$name.
EOF
