"""Benchmark command: the trainer against the reference recipe, measured side by side.

  python -m trainer.bench --backbone=resnet50 --image_size=128 --batch_size=16 --out=.

Measures input-pipeline images/sec (first and cached epoch), cache memory,
training images/sec after warm-up, the trainer's own overhead, peak resident
memory of each side and time per epoch at two data sizes, on the hardware it
runs on. Prints a table and writes bench.json.

The reference is the recipe of docs/reference.md: JPEGs decoded in parallel (as TFDS does
for tf_flowers), then `map(format_image).batch(B).prefetch(1)` with float32
images divided by 255, and a float32 model compiled with Keras defaults. Both
sides train interleaved in one process, so their ratio holds on a noisy
machine; peak memory comes from one fresh subprocess per side.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging as std_logging
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from typing import Any, Iterator

import numpy as np
import psutil
import tensorflow as tf
import tf_keras as keras
from absl import app, flags, logging
from PIL import Image

from trainer import cli, data, distribute, models
from trainer import config as config_lib
from trainer import train as train_lib
from trainer.config import Config, ModelConfig, UserError

flags.DEFINE_string("backbone", "resnet50", "One of " + ", ".join(config_lib.BACKBONES) + ".")
flags.DEFINE_string("weights", "none", "resnet50 only: none (random, as the reference's scratch "
                    "run; works offline), imagenet or a weights file.")
flags.DEFINE_string("hub_handle", None, "Hub backbones: URL or SavedModel directory.")
flags.DEFINE_integer("image_size", 128, "Square input size, pixels.")
flags.DEFINE_integer("batch_size", 16, "GLOBAL batch size of both sides "
                     "(the reference recipe's is 16).")
flags.DEFINE_integer("images", 512, "Images in the benchmark folder: generated ~500x375 JPEGs, "
                     "or spread evenly over --image_dir.")
flags.DEFINE_string("image_dir", None, "Folder with one sub-folder of images per class, "
                    "instead of generated JPEGs.")
flags.DEFINE_integer("train_steps", 5, "Timed training steps per side, after one warm-up step.")
flags.DEFINE_integer("round_steps", 1, "Steps one side runs before the next side's turn; "
                     "raise it on GPUs (e.g. 25) so that steps overlap as they do in fit.")
flags.DEFINE_integer("epoch_images", 32, "Training images in the smaller of the two epochs "
                     "timed to show how epoch time grows; the larger has twice as many.")
flags.DEFINE_integer("seed", 0, "Seeds the generated images, the split and initialisation.")
flags.DEFINE_string("out", ".", "Directory for bench.json.")

FLAGS = flags.FLAGS
BENCH_FILE = "bench.json"
GENERATED_SIZE = (500, 375)  # pixels (width, height): tf_flowers' typical photo
GENERATED_CLASSES = 5  # as tf_flowers
INPUT_REPEATS = 3  # interleaved first and later epochs of each input pipeline
CACHED_EPOCHS = 3  # epochs read from the trainer's cache per repeat; each takes milliseconds
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
MB = 1e6
SIDES = ("reference", "trainer", "trainer_matched")  # see create_side
# The trainer's settings that equal the reference recipe's, for the overhead check.
MATCHED_SETTINGS = {"precision": "float32", "jit_compile": "false", "steps_per_execution": 1,
                    "strategy": "default"}
REFERENCE_CHOICES = {"precision": "float32", "jit_compile": False, "steps_per_execution": 1,
                     "strategy": "default", "replicas": 1}
# (json section, key, comparison, value): the targets for a CPU with bf16 units.
TARGETS = (
    ("input", "first_epoch_ratio", ">=", 1.0),
    ("input", "cached_epoch_ratio", ">=", 10.0),
    ("input", "cache_memory_ratio", "<=", 0.3),
    ("train", "throughput_ratio", ">=", 1.8),
    ("train", "overhead_ratio", ">=", 0.95),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The benchmark's command line (model and data flags become a trainer Config)."""

    backbone: str
    weights: str
    hub_handle: str | None
    image_size: int  # pixels
    batch_size: int  # global, both sides
    images: int  # in the benchmark folder
    image_dir: str | None
    train_steps: int  # timed, per side
    round_steps: int  # per side per turn
    epoch_images: int  # training images of the smaller timed epoch
    seed: int
    out: str

    @classmethod
    def from_flags(cls, flag_values: flags.FlagValues) -> Settings:
        return cls(**{f.name: flag_values[f.name].value for f in dataclasses.fields(cls)})

    def check(self) -> None:
        """Raises UserError naming the flag of the first invalid value."""
        problems = [
            (self.images >= 2 * self.epoch_images + 1,
             f"--images={self.images} must be at least 2 x --epoch_images + 1 "
             f"({2 * self.epoch_images + 1})."),
            (self.epoch_images >= self.batch_size,
             f"--epoch_images={self.epoch_images} must be at least "
             f"--batch_size={self.batch_size}."),
            # Then the trainer's warm-up step reads the whole split into its cache
            # (its shuffle buffer fills first), and every later turn reads the cache.
            (self.images <= data.SHUFFLE_BUFFER,
             f"--images={self.images} is more than the trainer's shuffle buffer "
             f"({data.SHUFFLE_BUFFER} images); use at most that many."),
            (self.train_steps >= 1, f"--train_steps must be at least 1, got {self.train_steps}."),
            (self.round_steps >= 1 and self.train_steps % self.round_steps == 0,
             f"--round_steps={self.round_steps} must divide --train_steps={self.train_steps}."),
        ]
        for ok, message in problems:
            if not ok:
                raise UserError(message)


def trainer_config(settings: Settings, image_dir: str, num_images: int) -> Config:
    """The trainer's configuration as a user runs it on the benchmark folder (auto choices)."""
    values = {
        "backbone": settings.backbone, "weights": settings.weights,
        "hub_handle": settings.hub_handle, "image_size": settings.image_size,
        "global_batch_size": settings.batch_size, "image_dir": image_dir, "seed": settings.seed,
        # Nothing is evaluated, but a DataSource needs a validation split: one image.
        "val_fraction": 1 / num_images,
    }
    return config_lib.resolve(config_lib.override(Config(), values))


def hardware_info() -> dict[str, Any]:
    """CPU model and the flags that decide precision, GPUs, and library versions."""
    cpu_model, cpu_flags = platform.processor() or platform.machine(), set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()
                          if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        cpu_model = fields.get("model name", cpu_model)
        cpu_flags = set(fields.get("flags", "").split())
    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        gpus.append({"name": details.get("device_name", gpu.name),
                     "compute_capability": details.get("compute_capability")})
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        # Unknown (empty) where /proc/cpuinfo does not exist.
        "cpu_flags": {flag: flag in cpu_flags for flag in CPU_FLAGS} if cpu_flags else {},
        "cpu_bf16": distribute.cpu_has_bf16(),
        "gpus": gpus,
        "tensorflow": tf.__version__,
        "tf_keras": keras.__version__,
        "python": platform.python_version(),
    }


def write_jpegs(directory: str, count: int, seed: int) -> None:
    """Writes `count` JPEGs of 500x375 pixels and about 60 KB (like tf_flowers) in class folders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        class_dir = os.path.join(directory, f"class_{i % GENERATED_CLASSES}")
        os.makedirs(class_dir, exist_ok=True)
        # Smooth colour fields plus sensor-like noise: the file size, and so the
        # decode cost, of a photo; flat or pure-noise images would be far off.
        coarse = rng.uniform(0, 255, (12, 16, 3)).astype(np.uint8)
        pixels = np.asarray(Image.fromarray(coarse).resize(GENERATED_SIZE, Image.BICUBIC),
                            np.float32)
        pixels += rng.normal(0.0, 8.0, pixels.shape)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            os.path.join(class_dir, f"{i:05d}.jpg"), quality=90)


def link_subset(paths: list[str], directory: str, count: int) -> str:
    """Makes an image folder of `count` of `paths` (symlinks), spread evenly over them.

    `paths` are grouped by class (as list_image_folder returns them), so every
    class keeps its share.
    """
    for index in np.linspace(0, len(paths) - 1, count).round().astype(int):
        path = paths[index]
        class_dir = os.path.join(directory, os.path.basename(os.path.dirname(path)))
        os.makedirs(class_dir, exist_ok=True)
        os.symlink(os.path.abspath(path), os.path.join(class_dir, os.path.basename(path)))
    return directory


def reference_dataset(paths: list[str], labels: list[int], image_size: int, batch_size: int,
                      dtype: tf.DType = tf.float32, repeat: bool = False) -> tf.data.Dataset:
    """The reference recipe's input: decode, then map(format_image).batch().prefetch(1).

    Args:
      dtype: float32 divides by 255 as the reference does; uint8 gives what the
        trainer's models take (for the overhead check), at the same cost.
      repeat: loop over the files forever (training), so every batch is full.
    """
    files = tf.data.Dataset.from_tensor_slices((paths, labels))
    if repeat:
        files = files.repeat()
    # TFDS decodes tf_flowers in parallel before the recipe's own map; this stands in for it.
    images = files.map(
        lambda path, label: (tf.io.decode_image(tf.io.read_file(path), channels=3,
                                                expand_animations=False), label),
        num_parallel_calls=tf.data.AUTOTUNE)

    def format_image(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        if dtype == tf.uint8:
            return data.resize(image, image_size), label
        return tf.image.resize(image, (image_size, image_size)) / 255.0, label

    return images.map(format_image).batch(batch_size).prefetch(1)


def create_reference_model(config: ModelConfig, num_classes: int, image_size: int) -> keras.Model:
    """The reference recipe's model: the backbone on float32 /255 images, a softmax layer,
    Adam at its default rate and compile's defaults (no XLA, one step per execution)."""
    network = models.BACKBONES[config.backbone].build(config, image_size).network
    network.trainable = config.trainable
    model = keras.Sequential([keras.Input((image_size, image_size, 3)), network,
                              keras.layers.Dense(num_classes, activation="softmax")],
                             name="reference")
    model.compile(optimizer=keras.optimizers.Adam(), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def create_trainer_model(config: Config, strategy: tf.distribute.Strategy,
                         num_classes: int) -> tuple[keras.Model, dict[str, Any]]:
    """The trainer's model, compiled in `strategy.scope()` as train_and_evaluate does.

    Returns:
      (model, choices): precision, jit_compile, steps_per_execution, strategy,
      replicas, and why auto chose them.
    """
    precision, precision_reason = distribute.choose_precision(config.train, strategy)
    jit_compile, jit_reason = distribute.choose_jit_compile(config.train, strategy)
    logging.info("Trainer: precision %s (%s); jit_compile %s (%s).",
                 precision, precision_reason, jit_compile, jit_reason)
    distribute.set_precision(precision)
    try:
        model = train_lib.create_compiled_model(config, strategy, num_classes, jit_compile)
    finally:
        # Layers keep the policy they were built with; what is built next (the
        # reference) is float32.
        distribute.set_precision("float32")
    return model, {
        "precision": precision, "precision_reason": precision_reason,
        "jit_compile": jit_compile, "jit_compile_reason": jit_reason,
        "steps_per_execution": config.train.steps_per_execution,
        "strategy": type(strategy).__name__.lstrip("_"),
        "replicas": strategy.num_replicas_in_sync,
    }


def trainer_dataset(source: data.DataSource, strategy: tf.distribute.Strategy,
                    global_batch_size: int) -> tf.distribute.DistributedDataset | tf.data.Dataset:
    """The trainer's training input, one pipeline per worker, as train_and_evaluate builds it."""
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise UserError(f"--batch_size={global_batch_size} must divide evenly over the "
                        f"{replicas} replicas; use a multiple of {replicas}.")
    return strategy.distribute_datasets_from_function(
        lambda ctx: source.dataset("train", global_batch_size // replicas, ctx))


@dataclasses.dataclass
class Side:
    """One side of the training comparison: a compiled model, its input, its time so far."""

    name: str  # reference, trainer or trainer_matched
    model: keras.Model
    dataset: tf.data.Dataset | tf.distribute.DistributedDataset
    choices: dict[str, Any]  # precision, jit_compile, strategy ... (see create_trainer_model)
    images_per_call: int  # global batch x steps per execution
    turns: list[float] = dataclasses.field(default_factory=list)  # images/sec of each timed turn
    seconds: float = 0.0  # timed training so far
    images: int = 0  # trained in that time

    def run(self, calls: int) -> float:
        """Runs fit's own step function `calls` times on a new iterator; returns seconds.

        The iterator ends with the turn, so no side's pipeline prefetches, and
        spends CPU, in another side's time; a turn's first batch is read without
        overlap instead (for the reference, about one batch of decoding per turn).
        """
        start = time.perf_counter()
        iterator = iter(self.dataset)
        for _ in range(calls):
            logs = self.model.train_function(iterator)
        float(logs["loss"])  # waits for the device: GPU steps run asynchronously
        seconds = time.perf_counter() - start
        # Stops its prefetching now, outside the timed turn. The deletion may
        # wait for tf.data's autotuning thread (see EpochTimer): nobody's training time.
        del iterator
        return seconds

    def warm_up(self) -> None:
        """Traces the step function and runs one step (the trainer's fills its cache)."""
        self.model.make_train_function()
        seconds = self.run(1)
        logging.info("%s: traced and ran a first step in %.1f s.", self.name, seconds)

    def time(self, steps: int) -> None:
        """Runs and times one turn of `steps` steps."""
        calls = max(1, steps // self.choices["steps_per_execution"])
        seconds, images = self.run(calls), calls * self.images_per_call
        self.turns.append(images / seconds)
        self.seconds += seconds
        self.images += images


def create_side(name: str, config: Config) -> Side:
    """Builds one side on the folder `config.data.image_dir`.

    reference: the recipe; trainer: as a user runs it (auto choices, its
    pipeline); trainer_matched: the trainer's model and compile with the
    reference's precision, strategy and input, to measure its own overhead.
    """
    size, batch = config.data.image_size, config.data.global_batch_size
    if name == "trainer":
        strategy = distribute.create_strategy(config.train)
        source = data.create_data_source(config.data, config.seed)
        dataset = trainer_dataset(source, strategy, batch)
        model, choices = create_trainer_model(config, strategy, source.num_classes)
        return Side(name, model, dataset, choices,
                    images_per_call=batch * choices["steps_per_execution"])
    paths, labels, class_names = data.list_image_folder(config.data.image_dir)
    if name == "reference":
        model = create_reference_model(config.model, len(class_names), size)
        dataset = reference_dataset(paths, labels, size, batch, repeat=True)
        return Side(name, model, dataset, REFERENCE_CHOICES, images_per_call=batch)
    matched = config_lib.override(config, MATCHED_SETTINGS)
    model, choices = create_trainer_model(
        matched, distribute.create_strategy(matched.train), len(class_names))
    dataset = reference_dataset(paths, labels, size, batch, tf.uint8, repeat=True)
    return Side(name, model, dataset, choices, images_per_call=batch)


def time_input(config: Config, paths: list[str], labels: list[int]) -> dict[str, Any]:
    """Images/sec of the reference and the trainer's input pipelines, interleaved, and cache bytes.

    Each figure is the median of INPUT_REPEATS; each ratio the median of the
    ratios within a repeat. Every repeat builds a new trainer pipeline, whose
    first epoch fills a new cache.
    """
    size, batch = config.data.image_size, config.data.global_batch_size
    start = time.perf_counter()
    source = data.create_data_source(config.data, config.seed)
    setup_seconds = time.perf_counter() - start  # listing and checking the files
    steps = data.steps_per_epoch(source.sizes["train"], batch)
    reference = reference_dataset(paths, labels, size, batch)

    def reference_epoch() -> float:
        start = time.perf_counter()
        count = sum(int(images.shape[0]) for images, _ in reference)
        return count / (time.perf_counter() - start)

    def trainer_epochs(batches: Iterator, epochs: int) -> float:
        start = time.perf_counter()
        for _ in range(epochs * steps):
            next(batches)
        return epochs * steps * batch / (time.perf_counter() - start)

    speeds: dict[str, list[float]] = {"reference_first": [], "trainer_first": [],
                                      "reference_later": [], "trainer_cached": []}
    trainer_pipelines = [source.dataset("train", batch) for _ in range(INPUT_REPEATS)]
    for pipeline in trainer_pipelines:
        trainer_batches = iter(pipeline)
        # In the order a run meets them; the trainer's first epoch fills its cache.
        speeds["reference_first"].append(reference_epoch())
        speeds["trainer_first"].append(trainer_epochs(trainer_batches, 1))
        speeds["reference_later"].append(reference_epoch())
        speeds["trainer_cached"].append(trainer_epochs(trainer_batches, CACHED_EPOCHS))

    def ratio(new: str, old: str) -> float:
        return statistics.median(a / b for a, b in zip(speeds[new], speeds[old]))

    def example_bytes(batched_spec: Any) -> int:
        return sum(spec.shape[1:].num_elements() * spec.dtype.size
                   for spec in tf.nest.flatten(batched_spec))

    # What each cache would hold for all the images: (image, label) tensors of
    # these dtypes and shapes (tf.data's memory cache keeps the tensors as they are).
    trainer_cache = len(paths) * example_bytes(trainer_pipelines[0].element_spec)
    float32_cache = len(paths) * example_bytes(reference.element_spec)
    return {
        "images": len(paths),
        "trainer_setup_seconds": setup_seconds,
        **{f"{name}_epoch_images_per_sec": statistics.median(values)
           for name, values in speeds.items()},
        "first_epoch_ratio": ratio("trainer_first", "reference_first"),
        "cached_epoch_ratio": ratio("trainer_cached", "reference_later"),
        "trainer_cache_bytes": trainer_cache,
        "float32_cache_bytes": float32_cache,
        "cache_memory_ratio": trainer_cache / float32_cache,
    }


def time_training(sides: list[Side], train_steps: int, round_steps: int) -> dict[str, Any]:
    """Images/sec of each side after warm-up, the sides taking turns of `round_steps` steps.

    Ratios are medians over turns of the ratio within a turn: sides that run
    back to back share the machine's load, and a burst of other work spoils
    one turn's ratio instead of a side's total.
    """
    for side in sides:
        side.warm_up()
    load_before = os.getloadavg()[0]
    for turn in range(train_steps // round_steps):
        # Alternating the order keeps either side from always following the same one.
        for side in sides if turn % 2 == 0 else sides[::-1]:
            side.time(round_steps)
    by_name = {side.name: side for side in sides}

    def ratio(name: str) -> float:
        return statistics.median(
            new / old for new, old in zip(by_name[name].turns, by_name["reference"].turns))

    return {
        "timed_steps_per_side": train_steps,
        **{f"{side.name}_images_per_sec": side.images / side.seconds for side in sides},
        **{f"{side.name}_turn_images_per_sec": side.turns for side in sides},
        "throughput_ratio": ratio("trainer"),
        "overhead_ratio": ratio("trainer_matched"),
        # Other processes' demand for the CPUs (1-minute load average) around the timing.
        "load_average": [load_before, os.getloadavg()[0]],
        "trainer": by_name["trainer"].choices,
    }


class EpochTimer(keras.callbacks.Callback):
    """Seconds from the start to the end of fit's (last) epoch.

    Not fit's own duration: TF 2.21 deletes the input iterator as fit returns
    and then waits for tf.data's autotuning thread to wake, up to tens of
    seconds, once per fit rather than per epoch.
    """

    def __init__(self):
        super().__init__()
        self.seconds = self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seconds = time.perf_counter() - self._start


def time_epochs(trainer: Side, config: Config, paths: list[str], image_counts: tuple[int, int],
                workdir: str) -> dict[str, Any]:
    """Seconds per cached training epoch (fit, trainer side) for two counts of training images.

    Each epoch runs twice, in the order small, large, large, small, so that a
    drift in the machine's load hits both sizes alike; the faster of the two
    counts, as the one less disturbed by other work.
    """
    batch = config.data.global_batch_size
    strategy = trainer.model.distribute_strategy
    epochs = {}
    for count in image_counts:
        # One image more for the validation split every DataSource holds.
        folder = link_subset(paths, os.path.join(workdir, f"epoch-{count}"), count + 1)
        source = data.create_data_source(
            dataclasses.replace(config.data, image_dir=folder, val_fraction=1 / (count + 1)),
            config.seed)
        dataset = trainer_dataset(source, strategy, batch)
        # The first batch fills the memory cache (the shuffle buffer reads the
        # whole split), so the timed epochs are like those after the first.
        next(iter(dataset))
        epochs[count] = (dataset, data.steps_per_epoch(source.sizes["train"], batch))
    seconds: dict[int, list[float]] = {count: [] for count in image_counts}
    for count in image_counts + image_counts[::-1]:
        dataset, steps = epochs[count]
        timer = EpochTimer()
        trainer.model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer])
        seconds[count].append(timer.seconds)
    rows = [{"train_images": epochs[count][1] * batch, "steps": epochs[count][1],
             "seconds": min(seconds[count]), "all_seconds": seconds[count],
             "seconds_per_image": min(seconds[count]) / (epochs[count][1] * batch)}
            for count in image_counts]
    return {
        "sizes": rows,
        # 1.0: time per epoch proportional to the images in it.
        "linearity": rows[1]["seconds_per_image"] / rows[0]["seconds_per_image"],
    }


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far.

    Linux's VmHWM, not getrusage: a spawned child's ru_maxrss starts at its
    parent's RSS at fork time, because Linux keeps it across exec.
    """
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes, per process


def measure_side_memory(name: str, config: Config) -> dict[str, int]:
    """In a fresh process: builds one side and trains two steps; returns its memory in bytes.

    The first step allocates every activation, gradient and optimizer slot and
    fills the trainer's cache; allocator pools still grow by a few percent over
    the next steps, on both sides alike.
    """
    keras.utils.set_random_seed(config.seed)
    rss_at_start = psutil.Process().memory_info().rss  # Python, TensorFlow and the trainer loaded
    side = create_side(name, config)
    side.warm_up()
    side.run(1)
    return {"rss_at_start_bytes": rss_at_start, "peak_rss_bytes": peak_rss_bytes()}


def measure_memory(config: Config, names: tuple[str, ...]) -> dict[str, Any]:
    """Peak RSS of each side, each in its own fresh process (a shared one only ever grows).

    The processes run at the same time: their memory does not depend on speed.
    """
    spawn = multiprocessing.get_context("spawn")  # a new interpreter, nothing of this one's
    executors = [concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) for _ in names]
    try:
        futures = [executor.submit(measure_side_memory, name, config)
                   for executor, name in zip(executors, names)]
        results = dict(zip(names, (future.result() for future in futures)))
    finally:
        for executor in executors:
            executor.shutdown()
    figures = {f"{name}_{key}": value for name, result in results.items()
               for key, value in result.items()}
    figures["peak_rss_ratio"] = (results["trainer"]["peak_rss_bytes"]
                                 / results["reference"]["peak_rss_bytes"])
    return figures


def prepare_images(settings: Settings, workdir: str) -> str:
    """Returns the benchmark folder: generated JPEGs, or --images spread over --image_dir."""
    folder = os.path.join(workdir, "images")
    if settings.image_dir:
        paths, _, _ = data.list_image_folder(settings.image_dir)
        needed = 2 * settings.epoch_images + 1
        if len(paths) < needed:
            raise UserError(f"--image_dir={settings.image_dir} has {len(paths)} usable images; "
                            f"the timed epochs need {needed}. Lower --epoch_images.")
        return link_subset(paths, folder, min(settings.images, len(paths)))
    logging.info("Writing %d JPEGs of %dx%d pixels to %s.",
                 settings.images, *GENERATED_SIZE, folder)
    write_jpegs(folder, settings.images, settings.seed)
    return folder


def check_targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of the issue with the measured value and whether it was met."""
    checks = {}
    for section, key, comparison, target in TARGETS:
        value = report[section][key]
        met = value >= target if comparison == ">=" else value <= target
        checks[f"{section}.{key}"] = {"value": value, "target": f"{comparison} {target}",
                                      "met": met}
    return checks


def run(settings: Settings, command: str) -> dict[str, Any]:
    """Runs every measurement; returns the report (also written to --out/bench.json)."""
    settings.check()
    keras.utils.set_random_seed(settings.seed)
    report: dict[str, Any] = {"command": command,
                              "hardware": hardware_info(),
                              "settings": dataclasses.asdict(settings)}
    logging.info("Hardware: %s", report["hardware"])
    with tempfile.TemporaryDirectory(prefix="trainer-bench-") as workdir:
        folder = prepare_images(settings, workdir)
        paths, labels, _ = data.list_image_folder(folder)
        config = trainer_config(settings, folder, len(paths))
        # Read every file once so that neither side pays for cold disk reads.
        for path in paths:
            with open(path, "rb") as f:
                f.read()

        logging.info("Input pipelines on %d images.", len(paths))
        report["input"] = time_input(config, paths, labels)

        logging.info("Training: building and tracing %s.", ", ".join(SIDES))
        sides = [create_side(name, config) for name in SIDES]
        report["train"] = time_training(sides, settings.train_steps, settings.round_steps)

        logging.info("Epoch time for %d and %d training images.",
                     settings.epoch_images, 2 * settings.epoch_images)
        report["epochs"] = time_epochs(sides[SIDES.index("trainer")], config, paths,
                                       (settings.epoch_images, 2 * settings.epoch_images), workdir)

        logging.info("Peak memory: one fresh process per side.")
        report["memory"] = measure_memory(config, ("reference", "trainer"))
    report["targets"] = check_targets(report)
    os.makedirs(settings.out, exist_ok=True)
    path = os.path.join(settings.out, BENCH_FILE)
    with open(path, "w") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    logging.info("Wrote %s.", path)
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table: reference, trainer, ratio, target."""
    hw, s, inp, tr, mem, ep = (report[k] for k in ("hardware", "settings", "input", "train",
                                                    "memory", "epochs"))
    flags_text = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in hw["cpu_flags"].items())
    gpus = ", ".join(g["name"] for g in hw["gpus"]) or "none"
    choices = tr["trainer"]
    targets = report["targets"]

    def target(key: str) -> str:
        check = targets[key]
        return f"{check['target']}  {'met' if check['met'] else 'NOT met'}"

    rows = [
        ("Input, first epoch (images/s)", inp["reference_first_epoch_images_per_sec"],
         inp["trainer_first_epoch_images_per_sec"], inp["first_epoch_ratio"],
         target("input.first_epoch_ratio")),
        ("Input, later epoch (images/s; trainer cached)",
         inp["reference_later_epoch_images_per_sec"],
         inp["trainer_cached_epoch_images_per_sec"], inp["cached_epoch_ratio"],
         target("input.cached_epoch_ratio")),
        ("Cache memory (MB; float32 vs uint8)", inp["float32_cache_bytes"] / MB,
         inp["trainer_cache_bytes"] / MB, inp["cache_memory_ratio"],
         target("input.cache_memory_ratio")),
        ("Training (images/s)", tr["reference_images_per_sec"], tr["trainer_images_per_sec"],
         tr["throughput_ratio"], target("train.throughput_ratio")),
        ("Training, reference settings (overhead)", tr["reference_images_per_sec"],
         tr["trainer_matched_images_per_sec"], tr["overhead_ratio"],
         target("train.overhead_ratio")),
        ("Peak RSS (MB)", mem["reference_peak_rss_bytes"] / MB, mem["trainer_peak_rss_bytes"] / MB,
         mem["peak_rss_ratio"], ""),
    ]
    lines = [
        f"{report['command']}",
        f"CPU: {hw['cpu_model']} ({hw['cpu_count']} CPUs; {flags_text or 'flags unknown'}); "
        f"GPUs: {gpus}; TensorFlow {hw['tensorflow']}",
        f"{s['backbone']} at {s['image_size']} px, batch {s['batch_size']}, "
        f"{inp['images']} images; "
        f"{tr['timed_steps_per_side']} timed steps per side after warm-up",
        f"Trainer chose: {choices['precision']} ({choices['precision_reason']}); "
        f"jit_compile {choices['jit_compile']} ({choices['jit_compile_reason']}); "
        f"{choices['strategy']}, {choices['replicas']} replica(s)",
        "",
        f"{'':48}{'reference':>11}{'trainer':>11}{'ratio':>8}   target",
    ]
    lines += [f"{name:48}{ref:11.2f}{new:11.2f}{ratio:7.2f}x   {goal}"
              for name, ref, new, ratio, goal in rows]
    load = tr["load_average"]
    lines.append(f"Speed ratios are medians of the ratios within interleaved repeats (input) or "
                 f"turns (training).\nLoad average (1 min) around the training: {load[0]:.1f} "
                 f"before, {load[1]:.1f} after, on {hw['cpu_count']} CPUs.")
    lines += ["", "Trainer epoch time (cached epochs, fit; the faster of two runs):"]
    lines += [f"  {row['train_images']:6d} images: {row['seconds']:8.2f} s "
              f"({1000 * row['seconds_per_image']:.0f} ms per image)" for row in ep["sizes"]]
    lines.append(f"  per-image time, larger / smaller epoch: {ep['linearity']:.2f} (1.00 = linear)")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; every option is a --flag.")
    # TensorFlow's INFO lines (retracing notes, asset writes) drown the benchmark's.
    std_logging.getLogger("tensorflow").setLevel(std_logging.WARNING)
    try:
        command = " ".join(["python -m trainer.bench"] + sys.argv[1:])
        report = run(Settings.from_flags(FLAGS), command)
    except UserError as e:
        cli.fail(str(e))
    sys.stdout.write(format_table(report))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
