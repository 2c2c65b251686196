"""Strategy and precision from the config and the hardware; the only reader of TF_CONFIG and TPU resolvers.

Every automatic choice (strategy, precision, XLA) is logged with its reason.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

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


def choose_strategy(config: TrainConfig, num_gpus: int,
                    tf_config: dict | None) -> tuple[str, str]:
    """Returns (strategy name, reason) for `config.strategy` (auto: by hardware and TF_CONFIG).

    Args:
      config: the train section (strategy, tpu).
      num_gpus: GPUs visible to this process.
      tf_config: the parsed TF_CONFIG, or None.
    """
    if config.strategy != "auto":
        return config.strategy, "set by --strategy"
    if config.tpu:
        return "tpu", f"--tpu={config.tpu}"
    if tf_config is not None:
        # Kubeflow's TFJob and the Indexed Job set TF_CONFIG on every worker:
        # training each worker alone would waste all of them but one.
        workers = len(tf_config["cluster"]["worker"])
        return "multi_worker", f"TF_CONFIG names {workers} worker(s); this is {tf_config['task']['type']} {tf_config['task']['index']}"
    if num_gpus > 1:
        return "mirrored", f"{num_gpus} GPUs"
    return "default", f"{num_gpus} GPUs, no --tpu, no TF_CONFIG"


def create_strategy(config: TrainConfig) -> tf.distribute.Strategy:
    """Creates the distribution strategy `config.strategy` names (auto: see `choose_strategy`).

    Raises:
      UserError: TF_CONFIG is malformed, or multi_worker is asked for without it.
    """
    tf_config = parse_tf_config()
    name, why = choose_strategy(config, len(tf.config.list_physical_devices("GPU")), tf_config)
    logging.info("Strategy %s (%s).", name, why)
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=config.tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if name == "multi_worker":
        if tf_config is None:
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


def choose_precision(config: TrainConfig, strategy: tf.distribute.Strategy,
                     backbone_follows_policy: bool = True) -> tuple[str, str]:
    """Returns (policy name, reason) for `config.precision` on this hardware and backbone.

    Args:
      config: the train section (precision).
      strategy: the run's strategy (TPU or not).
      backbone_follows_policy: False for backbones that keep their own dtypes
        (TF Hub SavedModels): the head computes in float32 anyway, so a mixed
        policy would change nothing but add loss scaling; float32 is chosen.
    """
    policy, why = _hardware_precision(config, strategy)
    if policy != "float32" and not backbone_follows_policy:
        return "float32", ("a TF Hub SavedModel keeps its saved float32 dtypes and the head "
                           f"computes in float32: nothing would compute in {policy} ({why})")
    return policy, why


def _hardware_precision(config: TrainConfig, strategy: tf.distribute.Strategy) -> tuple[str, str]:
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
        return "mixed_bfloat16", ("the CPU has bfloat16 units (AVX512-BF16 or AMX), with which "
                                  "the native backbones trained 1.3x to 2x faster than in "
                                  "float32 (docs/decisions.md)")
    return "float32", "no TPU, no GPU of compute capability 7.0+ and no CPU bfloat16 units"


def describe_precision(policy: str, backbone_follows_policy: bool = True) -> dict[str, Any]:
    """What a run computes in under `policy`: the words its log, summary.json and HParams share.

    Returns:
      {"precision": policy, "backbone_dtype", "head_dtype", "loss_scaling"}; the
      head is float32 always (softmax and loss in full precision); loss scaling
      only when something computes in float16.
    """
    compute = keras.mixed_precision.Policy(policy).compute_dtype
    backbone_dtype = compute if backbone_follows_policy else "float32"
    return {"precision": policy, "backbone_dtype": backbone_dtype, "head_dtype": "float32",
            "loss_scaling": backbone_dtype == "float16"}


def precision_words(described: dict[str, Any]) -> str:
    """One line for the log: `mixed_bfloat16 (backbone bfloat16, head float32, no loss scaling)`."""
    return (f"{described['precision']} (backbone {described['backbone_dtype']}, head "
            f"{described['head_dtype']}, {'' if described['loss_scaling'] else 'no '}loss scaling)")


def choose_jit_compile(config: TrainConfig, strategy: tf.distribute.Strategy,
                       trainable_saved_model: bool = False) -> tuple[bool, str]:
    """Returns (jit_compile, reason): auto turns XLA on for GPUs only.

    Args:
      config: the train section (jit_compile).
      strategy: the run's strategy (TPU or not).
      trainable_saved_model: the backbone is a TF Hub SavedModel being fine-tuned.
        XLA cannot compile its gradient once: the SavedModel's functions pass the
        constants their gradients need (reduction axes, shapes) across a function
        call, which makes the image batch and the weights compile-time constants,
        so the train step would compile again at every step.

    Raises:
      UserError: --jit_compile=true with a trainable TF Hub backbone.
    """
    if config.jit_compile == "true" and trainable_saved_model:
        raise UserError(
            "--jit_compile=true cannot compile the training step of a trainable TF Hub "
            "backbone once: XLA would compile it again for every batch (about 150x slower). "
            "Use --jit_compile=auto or false, or --notrainable (a frozen hub backbone compiles).")
    if config.jit_compile != "auto":
        return config.jit_compile == "true", "set by --jit_compile"
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return False, "TPU programs are compiled with XLA anyway"
    if not tf.config.list_physical_devices("GPU"):
        return False, ("on CPUs XLA measured about 2x slower than TensorFlow's own kernels "
                       "(docs/decisions.md)")
    if trainable_saved_model:
        return False, ("a trainable TF Hub backbone would be compiled again at every step "
                       "(its SavedModel passes gradient constants across a function call)")
    return True, "XLA fuses GPU kernels"


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


def per_replica_batch_size(global_batch_size: int, strategy: tf.distribute.Strategy) -> int:
    """Returns the batch each replica computes: the global batch split evenly.

    Raises:
      UserError: the global batch does not divide over the replicas; names --batch_size.
    """
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise UserError(f"--batch_size={global_batch_size} must divide evenly over the "
                        f"{replicas} replicas; use a multiple of {replicas}.")
    return global_batch_size // replicas


class PeerLost(Exception):
    """A multi-worker peer stopped answering; restarting all workers resumes the run."""


@contextlib.contextmanager
def lost_peer_is_an_error(strategy: tf.distribute.Strategy) -> Iterator[None]:
    """Under MultiWorkerMirroredStrategy, turns a collective that timed out or lost its
    peer into PeerLost, which says what to do (TensorFlow has logged the details)."""
    try:
        yield
    except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError,
            tf.errors.CancelledError, tf.errors.AbortedError) as e:
        if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            raise
        raise PeerLost(
            f"A peer worker stopped answering ({type(e).__name__}; see TensorFlow's messages "
            "above). Restart all workers with the same command: they resume from the last "
            "completed epoch.") from None
