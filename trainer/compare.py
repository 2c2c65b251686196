"""Comparison of runs from their files: curves.png, loss.png, report.md/.csv and a TensorBoard HParams view.

  python -m trainer.compare runs/flowers --out=runs/flowers/report
  python -m trainer.compare runs/a runs/b/bit_finetune --nohparams

Reads only each run's config.json, history.csv and summary.json (never Keras
objects), so it works on runs made elsewhere, such as copies from a cluster.
A run without summary.json, or a run path that does not exist, is reported
as such in the table, never dropped.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import os
import sys
from typing import Any, Sequence

import tensorflow as tf
from absl import app, flags, logging
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from trainer import backbones, hparams
from trainer.cli import fail, parse_flags
from trainer.config import UserError
from trainer.files import write_atomically
from trainer.workdir import CONFIG_FILE, HISTORY_FILE, SUMMARY_FILE, read_history, summarize

RUN_FILES = (CONFIG_FILE, HISTORY_FILE, SUMMARY_FILE)
COLUMNS = (
    "run", "status", "backbone", "weights", "trainable", "learning_rate", "precision",
    "replicas", "epochs", "best_val_accuracy", "best_epoch", "final_val_accuracy",
    "train_images_per_sec", "total_epoch_time_sec",
)
HPARAMS_EVENTS_SUFFIX = ".compare.v2"  # names the experiment files this module owns


@dataclasses.dataclass(frozen=True)
class Run:
    """What a run directory holds; missing or unreadable files leave fields empty."""

    name: str
    path: str
    status: str  # "complete", "partial", "no epochs", "missing" or "unreadable: why"
    config: dict[str, Any]  # flattened config.json ({} if absent)
    history: list[dict[str, Any]]  # history.csv rows, epoch 1-based
    summary: dict[str, Any]  # summary.json, or figures computed from the history


def is_run(path: str) -> bool:
    """Whether `path` is a run directory (it holds one of config.json, history.csv, summary.json)."""
    return any(os.path.isfile(os.path.join(path, name)) for name in RUN_FILES)


def find_runs(paths: Sequence[str]) -> list[str]:
    """Expands run directories and parents of runs (their direct sub-directories) to run paths.

    A path that does not exist stays in the list (reported as a missing run).

    Raises:
      UserError: no path exists, or an existing one is neither a run nor holds one.
    """
    if not paths:
        raise UserError("Give at least one run directory or a directory of runs.")
    if not any(os.path.exists(path) for path in paths):
        raise UserError(f"None of {', '.join(paths)} exists; give run directories (a run's "
                        "--workdir) or a directory of runs.")
    runs = []
    for path in paths:
        if not os.path.exists(path) or is_run(path):
            runs.append(path)
            continue
        children = []
        if os.path.isdir(path):
            children = [os.path.join(path, name) for name in sorted(os.listdir(path))]
            children = [child for child in children if os.path.isdir(child) and is_run(child)]
        if not children:
            raise UserError(
                f"{path} is not a run directory (it has none of {', '.join(RUN_FILES)}) and no "
                "sub-directory of it is one. Give the --workdir of a run, or the directory "
                "that holds several.")
        runs += children
    return list(dict.fromkeys(os.path.normpath(run) for run in runs))


def _flatten(raw: dict[str, Any]) -> dict[str, Any]:
    """config.json's sections merged into one mapping (field names are unique across them)."""
    flat = {}
    for key, value in raw.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


def read_run(path: str, name: str) -> Run:
    """Reads one run directory; a file that cannot be parsed makes the status say which."""
    config, history, summary = {}, [], {}
    if not os.path.exists(path):
        return Run(name, path, "missing", config, history, summary)
    try:
        if os.path.exists(os.path.join(path, CONFIG_FILE)):
            with open(os.path.join(path, CONFIG_FILE)) as f:
                config = _flatten(json.load(f))
        history = read_history(os.path.join(path, HISTORY_FILE))
        if os.path.exists(os.path.join(path, SUMMARY_FILE)):
            with open(os.path.join(path, SUMMARY_FILE)) as f:
                summary = json.load(f)
        elif history:
            # The trainer's own figures, without the final evaluation it did not reach.
            summary = summarize(history, None)
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
        return Run(name, path, f"unreadable: {type(e).__name__}: {e}", config, [], {})
    if os.path.exists(os.path.join(path, SUMMARY_FILE)):
        status = "complete"
    elif history:
        status = "partial"  # interrupted, failed or still running
    else:
        status = "no epochs"  # failed before its first epoch ended, or not started
    return Run(name, path, status, config, history, summary)


def run_names(paths: Sequence[str]) -> list[str]:
    """Directory names, or paths relative to their common parent when names repeat."""
    names = [os.path.basename(os.path.abspath(path)) for path in paths]
    if len(set(names)) == len(names):
        return names
    root = os.path.commonpath([os.path.abspath(path) for path in paths])
    return [os.path.relpath(os.path.abspath(path), root) for path in paths]


def ran_with(run: Run) -> dict[str, Any]:
    """The run's config with what it ran with (summary.json) in place of what was asked for.

    `--precision=auto` or a mixed policy on a TF Hub backbone ran in one precision;
    `--jit_compile=auto` compiled or not: the words of the run's log, summary.json
    and HParams. A run without summary.json shows what was asked for, marked so.
    A rule's rate (bit_hyperrule: config.json's null) is in the summary.
    """
    values = dict(run.config)
    for name in ("precision", "jit_compile"):
        if name in run.summary:
            values[name] = run.summary[name]
        elif values.get(name) is not None:
            values[name] = f"{values[name]} (asked)"
    if "learning_rate" in run.summary:
        values["learning_rate"] = run.summary["learning_rate"]
    return values


def report_row(run: Run) -> dict[str, Any]:
    """One table row (COLUMNS) for a run; unknown values are None."""
    config, summary, used = run.config, run.summary, ran_with(run)
    return {
        "run": run.name,
        "status": run.status,
        "backbone": config.get("backbone"),
        "weights": backbones.weights_of(config),
        "trainable": config.get("trainable"),
        "learning_rate": used.get("learning_rate"),
        "precision": used.get("precision"),
        "replicas": summary.get("num_replicas"),
        "epochs": summary.get("epochs_completed", len(run.history)),
        "best_val_accuracy": summary.get("best_val_accuracy"),
        "best_epoch": summary.get("best_epoch"),
        "final_val_accuracy": summary.get("final_val_accuracy"),
        "train_images_per_sec": summary.get("train_images_per_sec"),
        # Named wall_time_sec in the summaries of earlier versions.
        "total_epoch_time_sec": summary.get("total_epoch_time_sec",
                                            summary.get("wall_time_sec")),
    }


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best val accuracy first; runs without one last, by name."""
    return sorted(rows, key=lambda row: (row["best_val_accuracy"] is None,
                                         -(row["best_val_accuracy"] or 0.0), row["run"]))


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if column in ("best_val_accuracy", "final_val_accuracy"):
            return f"{value:.4f}"
        if column == "learning_rate":
            return f"{value:g}"
        return f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a GitHub markdown table (COLUMNS; '-' for unknown)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = (_cell(c, row[c]).replace("|", "\\|") for c in COLUMNS)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_reports(rows: list[dict[str, Any]], out_dir: str) -> None:
    """Writes report.md (table and pictures) and report.csv (same rows, raw values)."""
    text = ("# Run comparison\n\nSorted by best validation accuracy. Status `partial`: no "
            "summary.json (interrupted, failed or still running), figures from its history.csv; "
            "`no epochs`: failed or stopped before its first epoch ended; `missing`: the "
            "directory does not exist.\n\n" + markdown_table(rows)
            + "\n![accuracy](curves.png)\n\n![loss](loss.png)\n")
    write_atomically(os.path.join(out_dir, "report.md"), text)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    write_atomically(os.path.join(out_dir, "report.csv"), out.getvalue())


def plot_curves(runs: Sequence[Run], metric: str, path: str) -> list[str]:
    """Plots train `metric` (solid) and val (dashed) per epoch, one colour per run.

    Returns:
      The legend labels, one per run that has epochs.
    """
    figure = Figure(figsize=(9, 5.5), dpi=100)
    axes = figure.add_subplot()
    colours = [f"C{i}" for i in range(10)] + [f"tab:{c}" for c in ("olive", "cyan")]
    handles, labels = [], []
    for i, run in enumerate(r for r in runs if r.history):
        colour = colours[i % len(colours)]
        epochs = [row["epoch"] for row in run.history]
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            values = [row.get(key, float("nan")) for row in run.history]
            axes.plot(epochs, values, style, color=colour, marker=".")
        label = run.name if run.status == "complete" else f"{run.name} ({run.status})"
        handles.append(Line2D([], [], color=colour))
        labels.append(label)
    # The line styles get their own legend entries, so every run is one entry.
    handles += [Line2D([], [], color="black", linestyle="-"),
                Line2D([], [], color="black", linestyle="--")]
    axes.legend(handles, labels + ["train", "validation"], fontsize="small",
                loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric}: train (solid) and validation (dashed)")
    axes.grid(alpha=0.3)
    figure.savefig(path, bbox_inches="tight")
    return labels


def write_hparams_experiment(runs: Sequence[Run], logdir: str) -> None:
    """Writes the HParams experiment (hyper-parameters and metrics) to `logdir`, the runs' parent.

    Each run wrote its own values at its root; this summary makes TensorBoard
    (`--logdir` the parent) show them together in one table that opens on the key
    settings whose values differ between the runs (trainer/hparams.py), with every
    setting's values as filters. A rerun replaces the summary written before.
    """
    values = [hparams.run_values(ran_with(run)) for run in runs if run.config]
    try:
        for old in glob.glob(os.path.join(logdir, f"events.out.tfevents.*{HPARAMS_EVENTS_SUFFIX}")):
            os.remove(old)
        hparams.write(logdir, [hparams.experiment_summary(values, hparams.shown_first(values))],
                      filename_suffix=HPARAMS_EVENTS_SUFFIX)
    except (OSError, tf.errors.OpError) as e:
        # Runs copied read-only still get their report; only the dashboard view is lost.
        logging.warning("HParams experiment not written to %s: %s", logdir, e)


def default_out_dir(run_paths: Sequence[str]) -> str:
    """report/ in the common parent directory of the runs."""
    return os.path.join(
        os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in run_paths]), "report")


def compare(paths: Sequence[str], out_dir: str, hparams: bool = True) -> list[dict[str, Any]]:
    """Reads the runs under `paths` and writes the pictures, reports and HParams experiment.

    Args:
      paths: run directories and/or directories of runs.
      out_dir: where curves.png, loss.png, report.md and report.csv go.
      hparams: also write the HParams experiment to the runs' parent directory
        (only when they share one).

    Returns:
      The report rows, sorted by best val accuracy.

    Raises:
      UserError: a path is not a run nor holds runs.
    """
    run_paths = find_runs(paths)
    runs = [read_run(path, name) for path, name in zip(run_paths, run_names(run_paths))]
    parents = {os.path.dirname(os.path.abspath(path)) for path in run_paths}
    os.makedirs(out_dir, exist_ok=True)
    rows = sort_rows([report_row(run) for run in runs])
    # Pictures list runs in the table's order, so colours follow the ranking.
    order = {row["run"]: i for i, row in enumerate(rows)}
    ranked = sorted(runs, key=lambda run: order[run.name])
    plot_curves(ranked, "accuracy", os.path.join(out_dir, "curves.png"))
    plot_curves(ranked, "loss", os.path.join(out_dir, "loss.png"))
    write_reports(rows, out_dir)
    if hparams and len(parents) == 1:
        write_hparams_experiment(runs, parents.pop())
    elif hparams:
        logging.info("HParams experiment not written: the runs are in %d different parent "
                     "directories (TensorBoard compares the runs of one --logdir).", len(parents))
    return rows


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command's flags. Only `run` calls it, so importing this module
    defines none: trainer.bench has an --out flag too, and tests import both."""
    flags.DEFINE_string("out", None, "Directory for curves.png, loss.png, report.md and "
                        "report.csv. Default: report/ in the runs' common parent directory.")
    flags.DEFINE_bool("hparams", True, "Write the TensorBoard HParams experiment to the runs' "
                      "parent directory, so `tensorboard --logdir=PARENT` compares them.")


def main(argv: list[str]) -> None:
    try:
        out_dir = FLAGS.out or default_out_dir(find_runs(argv[1:]))
        rows = compare(argv[1:], out_dir, FLAGS.hparams)
    except UserError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write the report: {e}")
    sys.stdout.write(markdown_table(rows) + f"\nWritten to {out_dir}: curves.png, loss.png, "
                     "report.md, report.csv.\n")


def run() -> None:
    """Entry point of `python -m trainer.compare` and scripts/compare_runs.py."""
    define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
