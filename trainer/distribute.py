"""Strategy and precision from the config and the hardware; the only reader of TF_CONFIG and TPU resolvers.

Every automatic choice (strategy, precision, XLA) is logged with its reason.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf
import tf_keras as keras
from absl import logging

from trainer.config import TrainConfig, UserError


def cpu_has_bf16() -> bool:
    """Whether the CPU has bfloat16 units (AVX512-BF16 or AMX), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """Compute capability of every visible NVIDIA GPU."""
    return [
        tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
        for gpu in tf.config.list_physical_devices("GPU")
    ]


def parse_tf_config(environ: dict[str, str] | None = None) -> dict | None:
    """Reads and checks TF_CONFIG before any collective is set up.

    Returns:
      The parsed TF_CONFIG, or None if it is not set.

    Raises:
      UserError: it is not JSON, or its cluster/task are inconsistent.
    """
    raw = (os.environ if environ is None else environ).get("TF_CONFIG")
    if not raw:
        return None
    try:
        tf_config = json.loads(raw)
        workers = tf_config["cluster"]["worker"]
        task_type, index = tf_config["task"]["type"], tf_config["task"]["index"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"TF_CONFIG is malformed ({e.__class__.__name__}: {e}); it must be JSON like "
            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}.'
        ) from None
    problems = []
    if not isinstance(workers, list) or not workers:
        problems.append("cluster.worker must be a non-empty list of host:port")
    elif len(set(workers)) != len(workers):
        problems.append(f"cluster.worker lists an address twice: {workers}")
    elif not all(isinstance(w, str) and w.rpartition(":")[2].isdigit() for w in workers):
        problems.append(f"every worker must be host:port, got {workers}")
    if task_type not in tf_config["cluster"]:
        problems.append(f"task.type {task_type!r} is not in the cluster")
    elif not isinstance(index, int) or not 0 <= index < len(tf_config["cluster"][task_type]):
        problems.append(f"task.index {index!r} is out of range for {task_type}")
    if problems:
        raise UserError("TF_CONFIG is inconsistent: " + "; ".join(problems) + ".")
    return tf_config


def create_strategy(config: TrainConfig) -> tf.distribute.Strategy:
    """Creates the distribution strategy `config.strategy` names (auto: by hardware)."""
    name = config.strategy
    if name == "auto":
        gpus = tf.config.list_physical_devices("GPU")
        name = "tpu" if config.tpu else "mirrored" if len(gpus) > 1 else "default"
        logging.info("--strategy=auto chose %s (%d GPUs, --tpu=%s).", name, len(gpus), config.tpu)
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=config.tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if name == "multi_worker":
        if parse_tf_config() is None:
            raise UserError("--strategy=multi_worker needs TF_CONFIG (the cluster and this "
                            "worker's index); see k8s/README.md.")
        # Without a timeout, a lost peer leaves the others waiting forever.
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=config.collective_timeout_sec)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "one_device":
        # MirroredStrategy on one device: Keras' BackupAndRestore (resume) does not
        # support OneDeviceStrategy.
        device = "/gpu:0" if tf.config.list_physical_devices("GPU") else "/cpu:0"
        return tf.distribute.MirroredStrategy([device])
    return tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes summaries, checkpoints and exports (worker 0 under TF_CONFIG)."""
    return strategy.extended.should_checkpoint


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """Worker processes taking part in the strategy (1 unless multi-worker)."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return strategy.cluster_resolver.cluster_spec().num_tasks("worker")
    return 1


def choose_precision(config: TrainConfig, strategy: tf.distribute.Strategy) -> tuple[str, str]:
    """Returns (policy name, reason) for `config.precision` on this hardware."""
    if config.precision != "auto":
        return config.precision, "set by --precision"
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "mixed_bfloat16", "TPUs compute in bfloat16"
    capabilities = gpu_compute_capabilities()
    if capabilities:
        if min(capabilities) >= (7, 0):
            return "mixed_float16", f"NVIDIA GPUs of compute capability {min(capabilities)} have tensor cores"
        return "float32", f"GPU compute capability {min(capabilities)} < 7.0 gains nothing from float16"
    if cpu_has_bf16():
        return "mixed_bfloat16", "the CPU has bfloat16 units (AVX512-BF16/AMX), about 2x faster"
    return "float32", "no TPU, no GPU of compute capability 7.0+ and no CPU bfloat16 units"


def choose_jit_compile(config: TrainConfig, strategy: tf.distribute.Strategy) -> tuple[bool, str]:
    """Returns (jit_compile, reason): auto turns XLA on for GPUs only."""
    if config.jit_compile != "auto":
        return config.jit_compile == "true", "set by --jit_compile"
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return False, "TPU programs are compiled with XLA anyway"
    if tf.config.list_physical_devices("GPU"):
        return True, "XLA fuses GPU kernels"
    return False, "XLA measured 2x slower than TensorFlow's CPU kernels (docs/decisions.md)"


def set_precision(policy: str) -> None:
    """Sets the global Keras mixed-precision policy (before the model is built)."""
    keras.mixed_precision.set_global_policy(policy)


TPU_STEPS_PER_EXECUTION = 32  # training steps per compiled call on TPUs (at most an epoch's)


def choose_steps_per_execution(config: TrainConfig, strategy: tf.distribute.Strategy,
                               steps_per_epoch: int) -> tuple[int, str]:
    """Returns (training steps per compiled call, reason) for this hardware.

    Args:
      config: `steps_per_execution` None chooses by hardware, a number is kept.
      strategy: the run's strategy.
      steps_per_epoch: training steps per epoch; a call never spans more.
    """
    if config.steps_per_execution is not None:
        return config.steps_per_execution, "set by --steps_per_execution"
    if isinstance(strategy, tf.distribute.TPUStrategy):
        steps = min(TPU_STEPS_PER_EXECUTION, steps_per_epoch)
        return steps, (f"a TPU waits for its host between calls; {TPU_STEPS_PER_EXECUTION} steps "
                       "per call, or an epoch's if fewer")
    return 1, "CPUs and GPUs gain little from more; one step per call keeps per-step callbacks exact"
