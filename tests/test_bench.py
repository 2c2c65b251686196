"""The benchmark command runs end to end on a tiny size and writes well-formed bench.json.

Speeds are never asserted: they belong to the machine, not to the code. The
command runs in a subprocess because it defines its own absl flags, as
trainer.main does, and both cannot live in one process.
"""

import json
import math
import subprocess
import sys

TINY = ["--backbone=wide_resnet", "--image_size=16", "--batch_size=4", "--images=20",
        "--epoch_images=4", "--train_steps=2"]
REQUIRED = {
    "input": ["first_epoch_ratio", "cached_epoch_ratio", "cache_memory_ratio",
              "reference_first_epoch_images_per_sec", "trainer_cached_epoch_images_per_sec",
              "trainer_cache_bytes", "float32_cache_bytes"],
    "train": ["throughput_ratio", "overhead_ratio", "reference_images_per_sec",
              "trainer_images_per_sec", "trainer_matched_images_per_sec"],
    "memory": ["reference_peak_rss_bytes", "trainer_peak_rss_bytes", "peak_rss_ratio"],
    "epochs": ["linearity"],
}


def run_bench(argv):
    return subprocess.run([sys.executable, "-m", "trainer.bench"] + argv,
                          capture_output=True, text=True, timeout=300)


def test_tiny_benchmark_writes_every_figure_and_prints_the_table(tmp_path):
    result = run_bench(TINY + [f"--out={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())

    for section, keys in REQUIRED.items():
        for key in keys:
            value = report[section][key]
            assert isinstance(value, (int, float)), (section, key)
            assert math.isfinite(value) and value > 0, (section, key)
    # uint8 against float32 of the same images: a quarter, plus the labels.
    assert 0.25 <= report["input"]["cache_memory_ratio"] < 0.3
    assert report["input"]["images"] == 20
    assert [row["train_images"] for row in report["epochs"]["sizes"]] == [4, 8]
    trainer = report["train"]["trainer"]
    assert trainer["precision"] in ("float32", "mixed_bfloat16", "mixed_float16")
    assert trainer["precision_reason"] and trainer["strategy"] and trainer["replicas"] >= 1
    hardware = report["hardware"]
    assert hardware["tensorflow"] and hardware["cpu_count"] >= 1
    assert isinstance(hardware["gpus"], list)
    assert set(report["targets"]) == {
        "input.first_epoch_ratio", "input.cached_epoch_ratio", "input.cache_memory_ratio",
        "train.throughput_ratio", "train.overhead_ratio"}
    assert all(isinstance(check["met"], bool) for check in report["targets"].values())
    assert "Training, reference settings (overhead)" in result.stdout
    assert "python -m trainer.bench --backbone=wide_resnet" in result.stdout


def test_too_few_images_for_the_epoch_sizes_names_the_flag(tmp_path):
    result = run_bench(["--images=8", "--epoch_images=4", f"--out={tmp_path}"])
    assert result.returncode == 2
    assert "--images=8" in result.stderr and "--epoch_images" in result.stderr
    assert not (tmp_path / "bench.json").exists()
