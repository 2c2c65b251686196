"""Benchmark report: hardware facts, the targets and whether each was met, the printed table.

Every ratio is printed beside the two figures it is the ratio of (trainer /
reference, each all images over all seconds of its timed runs), and below them
each run's figures and their ratios, so a reader can check every ratio.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import tensorflow as tf
import tf_keras as keras

from trainer import backbones, distribute
from trainer.bench import reference

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
MB = 1e6
LATER_EPOCH_TARGET = 10.0  # trainer (cached) / reference images/s of later epochs
CACHE_MEMORY_TARGET = 0.3  # trainer (uint8) / reference (float32) cache bytes
OVERHEAD_TARGET = 0.95  # the trainer at the reference's settings / the reference


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


def targets(report: dict[str, Any]) -> list[tuple[str, tuple[str, ...], str, float]]:
    """(name, path to the ratio in the report, comparison, target) of every target that applies."""
    found = []
    for name, scenario in report["scenarios"].items():
        if scenario["runs"] > 1:
            if scenario["sweep_target"] is not None:
                found.append((f"{name}.all_runs", ("scenarios", name, "input", "all_runs",
                                                   "ratio"), ">=", scenario["sweep_target"]))
            continue
        if scenario["first_epoch_target"] is not None:
            found.append((f"{name}.first_epoch", ("scenarios", name, "input", "first_epoch",
                                                  "ratio"), ">=", scenario["first_epoch_target"]))
        found.append((f"{name}.later_epoch", ("scenarios", name, "input", "later_epoch", "ratio"),
                      ">=", LATER_EPOCH_TARGET))
        found.append((f"{name}.cache_memory", ("scenarios", name, "input", "cache_memory",
                                               "ratio"), "<=", CACHE_MEMORY_TARGET))
    # Trainer / reference training images/s on a CPU with bfloat16 units (AVX512-BF16;
    # AMX gains more): the backbone's own.
    throughput = backbones.spec(report["settings"]["backbone"]).throughput_target
    if throughput is not None:
        found.append(("train.throughput", ("train", "throughput", "ratio"), ">=", throughput))
    if "overhead" in report["train"]:
        found.append(("train.overhead", ("train", "overhead", "ratio"), ">=", OVERHEAD_TARGET))
    return found


def check_targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target that applies, with the measured ratio and whether it was met."""
    checks = {}
    for name, path, comparison, target in targets(report):
        value = report
        for key in path:
            value = value[key]
        met = value >= target if comparison == ">=" else value <= target
        checks[name] = {"value": value, "target": f"{comparison} {target}", "met": met}
    return checks


def _target_text(report: dict[str, Any], name: str) -> str:
    check = report["targets"].get(name)
    if check is None:
        return ""
    return f"{check['target']}  {'met' if check['met'] else 'NOT met'}"


def _row(label: str, reference_value: float, trainer_value: float, ratio: float,
         target: str) -> str:
    # Five significant digits: enough to check a ratio printed to two decimals.
    return (f"  {label:46} {reference_value:>10.5g} {trainer_value:>10.5g} {ratio:>8.2f}x"
            f"   {target}").rstrip()


def _comparison_rows(label: str, comparison: dict[str, Any], runs: str, target: str) -> list[str]:
    """A ratio's row, then the runs its two figures total, with their own ratios."""
    def figures(values: list[float]) -> str:
        return " ".join(f"{value:.5g}" for value in values)

    run_ratios = [t / r for t, r in zip(comparison["trainer_runs_images_per_sec"],
                                        comparison["reference_runs_images_per_sec"])]
    return [
        _row(label, comparison["reference_images_per_sec"], comparison["trainer_images_per_sec"],
             comparison["ratio"], target),
        f"    = {comparison['reference_images']} images in {comparison['reference_seconds']:.5g} s"
        f" and {comparison['trainer_images']} images in {comparison['trainer_seconds']:.5g} s;"
        f" per {runs}: reference {figures(comparison['reference_runs_images_per_sec'])};"
        f" trainer {figures(comparison['trainer_runs_images_per_sec'])};"
        f" ratios {' '.join(f'{r:.2f}' for r in run_ratios)}"
        f" (median {comparison['median_run_ratio']:.2f})",
    ]


def format_table(report: dict[str, Any]) -> str:
    """The report as plain text: every ratio beside its two figures and their runs."""
    hw, settings, trainer = report["hardware"], report["settings"], report["trainer"]
    flags_text = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in hw["cpu_flags"].items())
    gpus = ", ".join(g["name"] for g in hw["gpus"]) or "none"
    header = f"{'':48} {'reference':>10} {'trainer':>10} {'ratio':>9}   target"
    lines = [
        report["command"],
        f"CPU: {hw['cpu_model']} ({hw['cpu_count']} CPUs; {flags_text or 'flags unknown'}); "
        f"GPUs: {gpus}; TensorFlow {hw['tensorflow']}",
        f"Model: {settings['backbone']}, global batch {settings['batch_size']}. Trainer chose: "
        f"{trainer['precision']} ({trainer['precision_reason']}); jit_compile "
        f"{trainer['jit_compile']} ({trainer['jit_compile_reason']}); "
        f"{trainer['steps_per_execution']} step(s) per execution "
        f"({trainer['steps_per_execution_reason']}); {trainer['strategy']}, "
        f"{trainer['replicas']} replica(s)",
        f"Reference: {report['reference']}",
        "Each ratio is trainer / reference of the two figures beside it; images/s are all "
        "images over all seconds of the runs listed below them.",
    ]
    for name, scenario in report["scenarios"].items():
        inp = scenario["input"]
        size = (f"{scenario['width']}x{scenario['height']} " if scenario["width"] else "")
        if scenario["runs"] > 1:
            lines += [
                "",
                f"Input, {name} ({scenario['description']}): {inp['runs']} runs of one epoch "
                f"each over the same {inp['train_images']} training {size}images at "
                f"{scenario['image_size']} px; the reference decodes in every run, the "
                "trainer's runs share one file cache",
                header,
                *_comparison_rows(f"{inp['runs']} runs, one epoch each (images/s)",
                                  inp["all_runs"], "run", _target_text(report, f"{name}.all_runs")),
            ]
            continue
        cache = inp["cache_memory"]
        lines += [
            "",
            f"Input, {name} ({scenario['description']}): {inp['train_images']} training "
            f"{size}images ({scenario['mean_file_bytes'] / 1e3:.0f} KB on average) at "
            f"{scenario['image_size']} px",
            header,
            *_comparison_rows("first epoch (images/s)", inp["first_epoch"], "repeat",
                              _target_text(report, f"{name}.first_epoch")),
            *_comparison_rows("later epochs (images/s; trainer cached)", inp["later_epoch"],
                              "repeat", _target_text(report, f"{name}.later_epoch")),
            _row("cache memory (MB; float32 vs the trainer's)", cache["reference_bytes"] / MB,
                 cache["trainer_bytes"] / MB, cache["ratio"],
                 _target_text(report, f"{name}.cache_memory")),
            f"    = {inp['train_images']} images x {cache['reference_bytes_per_image']:.0f} and "
            f"{cache['trainer_bytes_per_image']:.0f} bytes (image and label, as each pipeline "
            "delivered them)",
        ]
    train, memory, epochs = report["train"], report["memory"], report["epochs"]
    load = train["load_average"]
    lines += [
        "",
        f"Training on {report['training_scenario']}: {train['timed_steps_per_side']} timed steps "
        f"per side, taking turns, after one warm-up step; load average (1 min) "
        f"{load[0]:.1f} before, {load[1]:.1f} after, on {hw['cpu_count']} CPUs",
        header,
        *_comparison_rows("throughput (images/s)", train["throughput"], "turn",
                          _target_text(report, "train.throughput")),
    ]
    if "overhead" in train:
        lines += _comparison_rows("reference settings, overhead (images/s)", train["overhead"],
                                  "turn", _target_text(report, "train.overhead"))
    lines += [
        _row("peak RSS (MB; a fresh process each)", memory["reference_peak_rss_bytes"] / MB,
             memory["trainer_peak_rss_bytes"] / MB, memory["ratio"], ""),
        "",
        "Trainer epoch time (cached epochs, fit; the faster of two runs):",
        *[f"  {row['train_images']:6d} images: {row['seconds']:8.2f} s "
          f"({1000 * row['seconds_per_image']:.0f} ms per image)" for row in epochs["sizes"]],
        f"  per-image time, larger / smaller epoch: {epochs['linearity']:.2f} (1.00 = linear)",
    ]
    return "\n".join(lines) + "\n"


def describe_reference(backbone: str) -> str:
    """One line: what the reference side computes for `backbone`."""
    if backbone == reference.RECIPE_BACKBONE:
        return ("the recipe: Keras ResNet50 on float32 images / 255, a softmax layer, Adam(), "
                "float32, no XLA, one step per call, images decoded then resized on one thread")
    return (f"the trainer's {backbone} network as a saved model computes it: float32, no XLA, "
            "one step per call, fed by the recipe's pipeline (resized on one thread, uint8)")
