"""keras-transfer-trainer: transfer learning and fine-tuning of image backbones with Keras."""

from setuptools import find_packages, setup

setup(
    name="keras-transfer-trainer",
    version="0.1.0",
    description="Transfer learning and fine-tuning of pretrained image backbones, "
    "from a laptop CPU to GPUs, TPUs and Kubernetes.",
    packages=find_packages(include=["trainer", "trainer.*"]),
    python_requires=">=3.10",
    install_requires=[
        # 2.21 is what the tests run on (the newest each pin allows). 2.20 is allowed
        # for TPUs: tensorflow-tpu, TensorFlow's TPU build, has no newer release.
        "tensorflow>=2.20,<2.22",
        # hub.KerasLayer is a tf_keras layer: the Keras 2 API of the same minor version
        # (each tf-keras release itself requires its TensorFlow minor version).
        "tf-keras>=2.20,<2.22",
        # TensorFlow 2.21 no longer installs TensorBoard; 2.20 requires its own minor.
        "tensorboard>=2.20,<2.22",
        "tensorflow-hub>=0.16.1",
        "tensorflow-datasets>=4.9.7",
        "pillow>=10",
        "matplotlib>=3.8",
        "psutil>=5.9",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # `pytest -n 2`: the suite on two processes
            "hypothesis>=6.100",
            # tests/test_k8s.py: Kubernetes OpenAPI schemas (shipped, work offline), YAML.
            "kubernetes-validate>=1.31",
            "PyYAML>=6",
        ],
        # NVIDIA GPUs on Linux without a system CUDA: `tensorflow[and-cuda]` brings the
        # CUDA, cuDNN and NCCL libraries TensorFlow was built with as pip wheels (several
        # GB), under the same version range as `tensorflow` above. Needs only the NVIDIA
        # driver. The GPU image does not use it: its base image already has CUDA.
        "gpu": ["tensorflow[and-cuda]>=2.20,<2.22"],
        # TPU VMs (--tpu=local, what GKE uses): TensorFlow's TPU build and the TPU
        # runtime. tf-keras requires the `tensorflow` distribution too, and both
        # provide the `tensorflow` module: install this extra, then tensorflow-tpu
        # again over it (README, "TPUs"; Dockerfile.tpu). libtpu: the release
        # tensorflow-tpu 2.20.0 names as its minimum; later ones follow JAX.
        # cloud-tpu-client is left out on purpose: its 0.10 release downgrades
        # protobuf below what TensorFlow imports with.
        "tpu": ["tensorflow==2.20.0", "tensorflow-tpu==2.20.0", "libtpu==0.0.14"],
    },
    entry_points={"console_scripts": ["trainer=trainer.main:run"]},
)
