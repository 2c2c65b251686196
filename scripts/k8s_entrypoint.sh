#!/usr/bin/env bash
# The image's entry point: runs the trainer with the given flags and, for one
# worker of a multi-worker run, first exports its TF_CONFIG.
#
# Multi-worker mode is on when WORKER_HOSTS or WORKER_REPLICAS is set:
#   WORKER_HOSTS          host:port of every worker, comma-separated, in index
#                         order (worker 0 is the chief), e.g.
#                         WORKER_HOSTS=127.0.0.1:23456,127.0.0.1:23457
#   WORKER_REPLICAS       otherwise: the number of workers of an Indexed Job,
#                         whose pods are JOB_NAME-INDEX.WORKER_SERVICE; with
#   JOB_NAME              the Job's name
#   WORKER_SERVICE        the headless Service named in the pods' `subdomain`
#   WORKER_PORT           the port every worker listens on (default 2222)
#   JOB_COMPLETION_INDEX  this worker's index (Kubernetes sets it in an
#                         Indexed Job's pods)
# Every worker thus gets the same cluster list and its own index:
#   {"cluster": {"worker": [...]}, "task": {"type": "worker", "index": N}}
#
# TRAINER_CMD replaces the command that is run (default: python3 -m
# trainer.main), e.g. "/path/to/venv/bin/python -m trainer.main" or, to see
# the TF_CONFIG a pod would get, "printenv TF_CONFIG". It is split on spaces.
#
# Exit code 2 for a bad configuration, like the trainer's own usage errors:
# the Jobs' podFailurePolicy fails at once instead of retrying.
set -euo pipefail

fail() {
  echo "k8s_entrypoint: error: $*" >&2
  exit 2
}

is_count() { [[ $1 =~ ^[0-9]+$ ]]; }

build_tf_config() {
  local -a hosts
  if [[ -n ${WORKER_HOSTS:-} ]]; then
    IFS=, read -r -a hosts <<<"$WORKER_HOSTS"
  else
    if ! is_count "$WORKER_REPLICAS" || ((10#$WORKER_REPLICAS == 0)); then
      fail "WORKER_REPLICAS must be a positive number of workers, not '$WORKER_REPLICAS'."
    fi
    [[ -n ${JOB_NAME:-} ]] || fail "WORKER_REPLICAS needs JOB_NAME (the Indexed Job's name) to name the workers."
    [[ -n ${WORKER_SERVICE:-} ]] || fail "WORKER_REPLICAS needs WORKER_SERVICE (the headless Service in the pods' subdomain)."
    local port=${WORKER_PORT:-2222} i
    is_count "$port" || fail "WORKER_PORT must be a port number, not '$port'."
    for ((i = 0; i < 10#$WORKER_REPLICAS; i++)); do
      hosts+=("$JOB_NAME-$i.$WORKER_SERVICE:$port")
    done
  fi

  local index=${JOB_COMPLETION_INDEX:-}
  is_count "$index" || fail "JOB_COMPLETION_INDEX must be this worker's index (0 is the chief), not '$index'."
  ((10#$index < ${#hosts[@]})) || fail "JOB_COMPLETION_INDEX=$index, but there are only ${#hosts[@]} workers."

  local host list=""
  for host in "${hosts[@]}"; do
    # Checked, so that the JSON below needs no escaping.
    [[ $host =~ ^[A-Za-z0-9._-]+:[0-9]+$ || $host =~ ^\[[0-9A-Fa-f:.]+\]:[0-9]+$ ]] \
      || fail "worker address '$host' is not host:port."
    list+="${list:+,}\"$host\""
  done
  printf '{"cluster": {"worker": [%s]}, "task": {"type": "worker", "index": %d}}' "$list" "$((10#$index))"
}

if [[ -n ${WORKER_HOSTS:-} || -n ${WORKER_REPLICAS:-} ]]; then
  # Two sources of truth would disagree sooner or later.
  [[ -z ${TF_CONFIG:-} ]] || fail "TF_CONFIG is set as well as WORKER_HOSTS/WORKER_REPLICAS; set only one."
  TF_CONFIG=$(build_tf_config)
  export TF_CONFIG
  echo "k8s_entrypoint: TF_CONFIG=$TF_CONFIG" >&2
fi

read -r -a trainer_cmd <<<"${TRAINER_CMD:-python3 -m trainer.main}"
exec "${trainer_cmd[@]}" "$@"
