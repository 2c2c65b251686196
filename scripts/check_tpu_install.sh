#!/usr/bin/env bash
# Checks that the TPU install path resolves: runs the pip commands of
# Dockerfile.tpu (the README's TPU install command; tests/test_k8s.py keeps
# them equal) with --dry-run in a throwaway virtualenv, and prints what they
# would install. Needs the package index, so it is not part of `pytest`.
#
#   scripts/check_tpu_install.sh            # resolve only (a few MB of metadata)
#   scripts/check_tpu_install.sh --install  # install for real (about 1.5 GB), then
#                                           # pip check and import TensorFlow and the trainer
#
# PYTHON=... picks the interpreter (default python3; the TPU image has 3.11).
# No TPU is needed, nor used: on a machine without one this shows the install
# resolves and imports, not that it drives a TPU. Importing the TPU build
# starts libtpu, which asks the cloud's metadata server what TPU it is on and
# retries for minutes: --install imports it with that question answered by
# environment variables and, as root, in a network namespace of its own with no
# network (unshare --net), so nothing leaves the machine.
set -euo pipefail

mode=${1:-}
if [[ -n "$mode" && "$mode" != "--install" ]]; then
  echo "usage: $0 [--install]" >&2
  exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT

line=$(grep '^RUN pip install' "$repo/Dockerfile.tpu")
line=${line#RUN }
"${PYTHON:-python3}" -m venv "$venv"
echo "Dockerfile.tpu installs: $line"

"$venv/bin/pip" install --quiet --upgrade pip  # a current pip reads wheels' metadata alone
echo "Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'), $("$venv/bin/pip" --version | cut -d' ' -f1-2)"
cd "$repo"  # the commands install "." (this repository)
while IFS= read -r command; do
  read -ra words <<< "${command//\"/}"  # the Dockerfile quotes its arguments for the shell
  args=("${words[@]:2}")
  if [[ "$mode" == "--install" ]]; then
    echo "+ pip install ${args[*]}"
    "$venv/bin/pip" install --quiet "${args[@]}"
  else
    echo "+ pip install --dry-run ${args[*]}"
    "$venv/bin/pip" install --dry-run --quiet --ignore-installed --report "$venv/report.json" \
      "${args[@]}"
    "$venv/bin/python" - "$venv/report.json" <<'PY'
import json
import sys

installs = json.load(open(sys.argv[1]))["install"]
shown = ("tensorflow", "tensorflow-tpu", "tensorflow_tpu", "libtpu", "tf-keras", "tf_keras",
         "tensorboard", "keras", "protobuf", "numpy", "keras-transfer-trainer")
versions = {i["metadata"]["name"]: i["metadata"]["version"] for i in installs}
print(f"  would install {len(versions)} packages; among them: "
      + ", ".join(f"{name} {version}" for name, version in sorted(versions.items())
                  if name.lower() in shown))
PY
  fi
done < <(sed 's/ && /\n/g' <<< "$line")

if [[ "$mode" == "--install" ]]; then
  "$venv/bin/pip" check
  "$venv/bin/pip" list 2>/dev/null | grep -iE '^(tensorflow|tensorflow-tpu|libtpu|tf.keras|tensorboard|protobuf|numpy) '
  cd "$venv"  # import the installed package, not this checkout
  isolate=()
  if [[ $(id -u) == 0 ]] && command -v unshare > /dev/null; then
    isolate=(unshare --net)
  fi
  # A single local host: what libtpu would otherwise ask the metadata server.
  TPU_SKIP_MDS_QUERY=1 TPU_ACCELERATOR_TYPE=v5litepod-4 TPU_WORKER_ID=0 \
    TPU_WORKER_HOSTNAMES=localhost timeout 600 "${isolate[@]}" "$venv/bin/python" -c '
import tensorflow as tf, tf_keras, trainer.train
print("imported TensorFlow", tf.__version__, "and tf_keras", tf_keras.__version__,
      "from", tf.__file__.rsplit("/", 2)[0])'
fi
echo "The TPU install path resolves."
