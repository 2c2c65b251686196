"""Benchmark measurements: input pipelines, training turns, epoch times and peak memory.

Every side is built by the trainer's own functions (data source, strategy,
compute choices, distributed input, compiled model), so a change to the
trainer's input or model code is measured without editing the benchmark; only
the reference recipe (reference.py) is the benchmark's own.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import multiprocessing
import os
import resource
import statistics
import time
from typing import Any, Iterable

import psutil
import tensorflow as tf
import tf_keras as keras
from absl import logging

from trainer import compute as compute_lib
from trainer import config as config_lib
from trainer import distribute
from trainer import train as train_lib
from trainer.bench import reference, scenarios
from trainer.config import Config
from trainer.data import pipeline, sources

INPUT_REPEATS = 3  # interleaved first and later epochs of each input pipeline
CACHED_EPOCHS = 3  # epochs read from the trainer's cache per repeat; each takes milliseconds


@dataclasses.dataclass
class Runs:
    """Images and seconds of each timed run (an epoch, a turn) of one side."""

    images: list[int] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)

    def add(self, images: int, seconds: float) -> None:
        self.images.append(images)
        self.seconds.append(seconds)

    def images_per_sec(self) -> float:
        """All images over all seconds: the figure a ratio is taken of."""
        return sum(self.images) / sum(self.seconds)

    def per_run(self) -> list[float]:
        return [images / seconds for images, seconds in zip(self.images, self.seconds)]


def compare(reference_runs: Runs, trainer_runs: Runs) -> dict[str, Any]:
    """The two sides' images/sec (all images / all seconds), their ratio, and each run's figures.

    `ratio` is trainer / reference of the two totals beside it, so a reader can
    check it; the median of the runs' ratios (runs that took turns share the
    machine's load) is kept beside it as a check on bursts of other work.
    """
    reference_ips, trainer_ips = reference_runs.images_per_sec(), trainer_runs.images_per_sec()
    run_ratios = [t / r for t, r in zip(trainer_runs.per_run(), reference_runs.per_run())]
    return {
        "reference_images_per_sec": reference_ips,
        "trainer_images_per_sec": trainer_ips,
        "ratio": trainer_ips / reference_ips,
        "reference_images": sum(reference_runs.images),
        "reference_seconds": sum(reference_runs.seconds),
        "trainer_images": sum(trainer_runs.images),
        "trainer_seconds": sum(trainer_runs.seconds),
        "reference_runs_images_per_sec": reference_runs.per_run(),
        "trainer_runs_images_per_sec": trainer_runs.per_run(),
        "median_run_ratio": statistics.median(run_ratios),
    }


def settle() -> None:
    """Quiets what earlier measurements left running before the next timing: the
    iterators of their input pipelines, whose tf.data threads (autotuning) live until
    the garbage collector frees them, and the pages they wrote, which the kernel writes
    back in the background. Either shares the CPUs with a timing taken meanwhile."""
    gc.collect()
    os.sync()


def read_epoch(batches: Iterable, count: int | None = None) -> tuple[int, int, float]:
    """Reads `count` batches (None: until the end); returns (images, bytes, seconds).

    Bytes are those of the tensors delivered (images and labels, by their real
    shape and dtype): over an epoch of every training image once, what a cache
    of them holds.
    """
    start = time.perf_counter()
    iterator = iter(batches)
    images = num_bytes = 0
    for index, batch in enumerate(iterator):
        images += int(batch[0].shape[0])
        num_bytes += sum(t.shape.num_elements() * t.dtype.size for t in tf.nest.flatten(batch))
        if count is not None and index + 1 == count:
            break
    return images, num_bytes, time.perf_counter() - start


def time_input(config: Config) -> dict[str, Any]:
    """Images/sec of the recipe's and the trainer's input pipelines, interleaved, and the
    memory a cache of each one's images takes.

    Both read the trainer's training split of `config.data.image_dir`. Each of
    INPUT_REPEATS builds a new trainer pipeline, whose first epoch fills a new cache.
    """
    config, source, _, _ = train_lib.prepare_data(config)
    size, batch = config.data.image_size, config.data.global_batch_size
    train_images = source.sizes["train"]
    steps = pipeline.steps_per_epoch(train_images, batch)
    recipe = reference.dataset(source.examples["train"](), size, batch)
    runs = {key: Runs() for key in ("reference_first", "trainer_first", "reference_later",
                                    "trainer_cached")}
    bytes_per_image = {}
    for repeat in range(INPUT_REPEATS):
        trainer_batches = iter(pipeline.create_dataset(source, "train", batch))
        # In the order a run meets them; the trainer's first epoch fills its cache.
        images, num_bytes, seconds = read_epoch(recipe)
        runs["reference_first"].add(images, seconds)
        bytes_per_image.setdefault("reference", num_bytes / images)
        images, num_bytes, seconds = read_epoch(trainer_batches, steps)
        runs["trainer_first"].add(images, seconds)
        bytes_per_image.setdefault("trainer", num_bytes / images)
        images, _, seconds = read_epoch(recipe)
        runs["reference_later"].add(images, seconds)
        images, _, seconds = read_epoch(trainer_batches, CACHED_EPOCHS * steps)
        runs["trainer_cached"].add(images, seconds)
        del trainer_batches
        settle()
    cache = {side: per_image * train_images for side, per_image in bytes_per_image.items()}
    return {
        "train_images": train_images,
        "steps_per_epoch": steps,
        "first_epoch": compare(runs["reference_first"], runs["trainer_first"]),
        "later_epoch": compare(runs["reference_later"], runs["trainer_cached"]),
        "cache_memory": {
            "reference_bytes": cache["reference"], "trainer_bytes": cache["trainer"],
            "ratio": cache["trainer"] / cache["reference"],
            "reference_bytes_per_image": bytes_per_image["reference"],
            "trainer_bytes_per_image": bytes_per_image["trainer"],
        },
    }


def time_sweep(config: Config, runs: int, cache_dir: str) -> dict[str, Any]:
    """Images/sec of `runs` runs of one epoch each over the same images, interleaved: the
    recipe decodes in every run; the trainer's runs share one file cache in `cache_dir`
    (--cache=DIR, as scripts/run_experiments.sh runs them), so only the first decodes.

    Each trainer run makes its data source anew (listing the folder, choosing its
    cache) as a run does; that set-up is recorded beside the epochs, outside their time.
    """
    config = config_lib.override(config, {"cache": cache_dir})
    size, batch = config.data.image_size, config.data.global_batch_size
    reference_runs, trainer_runs, setup_seconds = Runs(), Runs(), []
    for _ in range(runs):
        start = time.perf_counter()
        _, source, steps, _ = train_lib.prepare_data(config)
        setup_seconds.append(time.perf_counter() - start)
        images, _, seconds = read_epoch(reference.dataset(source.examples["train"](), size, batch))
        reference_runs.add(images, seconds)
        images, _, seconds = read_epoch(pipeline.create_dataset(source, "train", batch), steps)
        trainer_runs.add(images, seconds)
        settle()  # each run of a sweep is a process of its own
    return {
        "runs": runs,
        "train_images": source.sizes["train"],
        "all_runs": compare(reference_runs, trainer_runs),
        "trainer_setup_seconds": setup_seconds,
    }


@dataclasses.dataclass
class Side:
    """One side of the training comparison: a compiled model, its input, its timed turns."""

    name: str  # reference, trainer or trainer_matched
    model: keras.Model
    dataset: tf.data.Dataset | tf.distribute.DistributedDataset
    compute: compute_lib.Compute
    strategy: str  # class name
    replicas: int
    images_per_call: int  # global batch x steps per execution
    runs: Runs = dataclasses.field(default_factory=Runs)

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
        """Traces the step function and runs one call (the trainer's fills its cache)."""
        self.model.make_train_function()
        seconds = self.run(1)
        logging.info("%s: traced and ran a first step in %.1f s.", self.name, seconds)

    def time(self, steps: int) -> None:
        """Runs and times one turn of at least `steps` steps."""
        calls = max(1, steps // self.compute.steps_per_execution)
        seconds = self.run(calls)
        self.runs.add(calls * self.images_per_call, seconds)


def side_names(backbone: str) -> tuple[str, ...]:
    """reference, trainer, and for the recipe's own backbone the trainer at its settings."""
    if backbone == reference.RECIPE_BACKBONE:
        return ("reference", "trainer", "trainer_matched")
    return ("reference", "trainer")


def create_side(name: str, config: Config) -> Side:
    """Builds one side on the folder `config.data.image_dir`.

    reference: the recipe (reference.py); trainer: as a user runs it (auto
    choices, its pipeline, its model); trainer_matched: the trainer's model at
    the recipe's settings fed by the recipe's pipeline: its ratio to the
    reference is the trainer's own overhead.
    """
    batch = config.data.global_batch_size
    if name == "trainer":
        strategy = distribute.create_strategy(config.train)
        run = train_lib.setup(config, strategy)
        return Side(name, run.model, run.train_data, run.compute,
                    type(strategy).__name__.lstrip("_"), strategy.num_replicas_in_sync,
                    images_per_call=batch * run.compute.steps_per_execution)
    source = sources.create_data_source(config.data, config.seed)
    if name == "reference":
        model = reference.create_model(config, source.num_classes)
        dtype = reference.input_dtype(config.model.backbone)
    else:
        model = train_lib.create_compiled_model(config, tf.distribute.get_strategy(),
                                                source.num_classes, reference.REFERENCE_COMPUTE)
        dtype = tf.uint8
    dataset = reference.dataset(source.examples["train"](), config.data.image_size, batch, dtype,
                                repeat=True)
    return Side(name, model, dataset, reference.REFERENCE_COMPUTE, "DefaultDistributionStrategy",
                1, images_per_call=batch)


def time_training(sides: list[Side], train_steps: int, round_steps: int) -> dict[str, Any]:
    """Images/sec of each side after warm-up, the sides taking turns of `round_steps` steps.

    The order alternates, so no side always follows the same one.
    """
    for side in sides:
        side.warm_up()
    load_before = os.getloadavg()[0]
    for turn in range(train_steps // round_steps):
        for side in sides if turn % 2 == 0 else sides[::-1]:
            side.time(round_steps)
    by_name = {side.name: side for side in sides}
    report = {
        "timed_steps_per_side": train_steps,
        "throughput": compare(by_name["reference"].runs, by_name["trainer"].runs),
        # Other processes' demand for the CPUs (1-minute load average) around the timing.
        "load_average": [load_before, os.getloadavg()[0]],
    }
    if "trainer_matched" in by_name:
        report["overhead"] = compare(by_name["reference"].runs, by_name["trainer_matched"].runs)
    return report


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
        folder = scenarios.link_subset(paths, os.path.join(workdir, f"epoch-{count}"), count + 1)
        _, source, steps, _ = train_lib.prepare_data(config_lib.override(
            config, {"image_dir": folder, "val_fraction": 1 / (count + 1)}))
        dataset = train_lib.distributed_dataset(source, "train", strategy, batch)
        # The first batch fills the memory cache (the shuffle buffer reads the
        # whole split), so the timed epochs are like those after the first.
        next(iter(dataset))
        epochs[count] = (dataset, steps)
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


def measure_memory(config: Config) -> dict[str, Any]:
    """Peak RSS of the reference and the trainer, each in its own fresh process (a shared
    one only ever grows). The processes run at the same time: memory does not depend on speed.
    """
    names = ("reference", "trainer")
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
    figures["ratio"] = figures["trainer_peak_rss_bytes"] / figures["reference_peak_rss_bytes"]
    return figures
