# The trainer on NVIDIA GPUs: TensorFlow with CUDA, and this package installed
# with exactly the README's install command for images (tests/test_k8s.py
# compares them): what the trainer needs, not the test tools. TPUs: Dockerfile.tpu.
#   docker build -t REGISTRY/keras-transfer-trainer:TAG .
# Hyper-parameters are not baked in: the Kubernetes Jobs pass trainer flags.
# Skipped checkov check, and why (tests/test_k8s.py scans this file):
# checkov:skip=CKV_DOCKER_2:No HEALTHCHECK: the image runs batch training, and Kubernetes ignores HEALTHCHECK (TensorBoard's Deployment has its own probes).
FROM tensorflow/tensorflow:2.21.0-gpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . .
RUN pip install .

# Runs as this unprivileged user; the Kubernetes manifests run it with the
# same UID and a read-only root filesystem.
RUN groupadd --gid 10001 trainer \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin trainer
USER 10001:10001
ENV HOME=/tmp

# Builds TF_CONFIG for multi-worker pods, then runs `python3 -m trainer.main`
# with the container's arguments (the trainer flags).
ENTRYPOINT ["/app/scripts/k8s_entrypoint.sh"]
CMD ["--helpshort"]
