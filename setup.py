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
        "tensorflow~=2.21.0",
        # hub.KerasLayer is a tf_keras layer: the Keras 2 API of the same minor version.
        "tf-keras~=2.21.0",
        # TensorFlow 2.21 no longer installs TensorBoard.
        "tensorboard~=2.21.0",
        "tensorflow-hub>=0.16.1",
        "tensorflow-datasets>=4.9.7",
        "pillow>=10",
        "matplotlib>=3.8",
        "psutil>=5.9",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            # tests/test_k8s.py: Kubernetes OpenAPI schemas (shipped, work offline), YAML.
            "kubernetes-validate>=1.31",
            "PyYAML>=6",
        ],
        # TPU VMs (--tpu=local, what GKE uses) need nothing more. cloud-tpu-client
        # is left out on purpose: its 0.10 release downgrades protobuf below what
        # TensorFlow 2.21 imports with.
        "tpu": [],
    },
    entry_points={"console_scripts": ["trainer=trainer.main:run"]},
)
