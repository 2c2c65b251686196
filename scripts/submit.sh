#!/usr/bin/env bash
# Submits one training run (or TensorBoard) to the current kubectl context.
#
#   scripts/submit.sh gpu|tpu|multiworker|tensorboard --image=REGISTRY/IMAGE:TAG
#       [--name=RUN] [--workers=N] [--dry-run] [-- TRAINER_FLAGS...]
#
#   --image    the image to run (REGISTRY/IMAGE:TAG or REGISTRY/IMAGE@sha256:DIGEST)
#   --name     the run's name: the Job's name and its workdir /runs/RUN on the
#              runs volume (default: bit-finetune-DATE-TIME). Submitting the
#              same name again, after `kubectl delete job RUN`, resumes that run.
#   --workers  multiworker only: the number of worker pods (default 2)
#   --dry-run  print the manifests instead of applying them
#   TRAINER_FLAGS are appended to the Job's trainer flags; a flag given twice
#   takes the last value, so these override the overlay's.
#
# It writes a kustomization that builds on k8s/overlays/MODE into a temporary
# directory and applies it with `kubectl apply -k`. KUBECTL names another
# kubectl binary.
set -euo pipefail

usage() {
  sed -n '4,14s/^# \{0,1\}//p' "$0" >&2
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
  gpu | tpu | multiworker | tensorboard) ;;
  -h | --help) usage 0 ;;
  *) fail "unknown mode '$mode': one of gpu, tpu, multiworker, tensorboard." ;;
esac

image="" name="" workers="" dry_run=false
while (($# > 0)); do
  case $1 in
    --image=*) image=${1#*=} ;;
    --name=*) name=${1#*=} ;;
    --workers=*) workers=${1#*=} ;;
    --dry-run) dry_run=true ;;
    -h | --help) usage 0 ;;
    --) shift && break ;;
    *) fail "unknown option '$1' (trainer flags go after --)." ;;
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

if [[ $mode == tensorboard ]]; then
  [[ -z $name && -z $workers && ${#trainer_flags[@]} -eq 0 ]] \
    || fail "tensorboard takes only --image and --dry-run."
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
  if [[ $mode == tensorboard ]]; then
    echo "  - target: {kind: Deployment, name: tensorboard}"
  else
    echo "  - target: {kind: Job, name: bit-finetune}"
  fi
  echo "    patch: |-"
  echo "      - {op: replace, path: /spec/template/spec/containers/0/image, value: $(json "$image")}"
  if [[ $mode != tensorboard ]]; then
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
  exec "$kubectl" kustomize "$workdir"
fi
"$kubectl" apply -k "$workdir"

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
