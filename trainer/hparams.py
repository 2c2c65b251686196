"""What TensorBoard's HParams dashboard shows of runs: the values each run used, and the settings it opens on.

How the dashboard picks its columns (TensorBoard 2.21): the server sorts the
hyper-parameters of the experiment by `differs` (True first), then by name;
the page shows the first five (its kNumHParamsToDisplayByDefault) and hides the
rest behind check boxes. Without an experiment summary the server computes
`differs` (do the runs' values differ?), so a directory of runs opened on
whichever settings happened to differ, in alphabetical order (dataset,
early_stopping_patience, epochs, experiment, export), never on the backbone.

So every run writes, beside its values, an experiment summary in which
`differs` marks the five of KEY_HPARAMS (the settings people compare runs by,
in that order of importance) the dashboard is to open on; every other setting
follows, one tick away. `trainer.compare` writes the same for a directory of
runs, choosing among KEY_HPARAMS those whose values differ first, with each
setting's values for the dashboard's filters. The dashboard reads one
experiment summary per directory it is opened on.

The values are what the run used, not what was asked for: `weights` as the
backbone's spec words them (a BiT run names its .npz file), `dataset` the image
folder, TFDS name or synthetic it trained on, and (from the run) the precision,
XLA choice and rule-chosen rate.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import tensorflow as tf
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.hparams import plugin_data_pb2

from trainer import backbones

# The settings people compare runs by, most telling first.
KEY_HPARAMS = ("backbone", "weights", "trainable", "learning_rate", "global_batch_size",
               "precision", "dataset")
SHOWN_HPARAMS = 5  # columns the dashboard shows at first (tf-hparams-query-pane's default)
# TensorBoard metrics: (tag, run sub-directory, display name); the Keras
# TensorBoard callback writes them under each run's train/ and validation/.
METRICS = (
    ("epoch_accuracy", "validation", "val accuracy"),
    ("epoch_accuracy", "train", "train accuracy"),
    ("epoch_loss", "validation", "val loss"),
    ("epoch_loss", "train", "train loss"),
)


def data_used(config: Mapping[str, Any]) -> str | None:
    """The data a run trained on, from its flat config: the --image_dir folder, else the
    TFDS name or synthetic (--dataset)."""
    return config.get("image_dir") or config.get("dataset")


def run_values(config: Mapping[str, Any], used: Mapping[str, Any] | None = None,
               ) -> dict[str, Any]:
    """A run's HParams: its flat config with what it used in place of what was asked for.

    Args:
      config: the run's flat config (config.flatten, or config.json's sections merged).
      used: values the run resolved after its config was written (precision,
        jit_compile, a rule's learning_rate); replace the config's.

    Returns:
      name -> bool, number or string (None as ""), `weights` and `dataset` naming
      what the run started from and trained on.
    """
    values = {**config, **(used or {})}
    values["weights"] = backbones.weights_of(config)
    values["dataset"] = data_used(config)
    return {name: "" if value is None else value for name, value in values.items()}


def shown_first(runs: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """The SHOWN_HPARAMS of KEY_HPARAMS the dashboard opens on: those whose values differ
    between `runs` (their run_values) first, then the others, in KEY_HPARAMS order."""
    differ = [name for name in KEY_HPARAMS if len({repr(run.get(name)) for run in runs}) > 1]
    return tuple((differ + [name for name in KEY_HPARAMS if name not in differ])[:SHOWN_HPARAMS])


def _domain(values: Sequence[Any]) -> hp.Discrete | None:
    """The values seen, for the dashboard's filter; None when their types are mixed."""
    distinct = sorted(set(values), key=repr)
    kinds = {type(value) for value in distinct}
    if len(kinds) != 1 or not isinstance(distinct[0], (bool, int, float, str)):
        return None
    return hp.Discrete(distinct)


def experiment_summary(runs: Sequence[Mapping[str, Any]], shown: Sequence[str],
                       filters: bool = True) -> summary_pb2.Summary:
    """The experiment summary of `runs` (their run_values): every hyper-parameter they
    have, KEY_HPARAMS first, and METRICS.

    Args:
      runs: the values of each run the experiment covers.
      shown: the hyper-parameters the dashboard opens on (at most SHOWN_HPARAMS).
      filters: list each hyper-parameter's values, which the dashboard offers as
        filters; only when `runs` are all the runs it will show.
    """
    names = list(dict.fromkeys([*KEY_HPARAMS, *(name for run in runs for name in run)]))
    summary = hp.hparams_config_pb(
        hparams=[hp.HParam(name, _domain([run[name] for run in runs if name in run])
                           if filters else None) for name in names],
        metrics=[hp.Metric(tag, group=group, display_name=display)
                 for tag, group, display in METRICS])
    # The server sorts by `differs`, then by name; the page shows the first five. The
    # API has no argument for it: set it in the summary's own message.
    (value,) = summary.value
    plugin_data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in plugin_data.experiment.hparam_infos:
        info.differs = info.name in shown
    value.metadata.plugin_data.content = plugin_data.SerializeToString()
    return summary


def write(logdir: str, summaries: Sequence[summary_pb2.Summary],
          filename_suffix: str = ".v2") -> None:
    """Writes HParams summaries (experiment_summary, hp.hparams_pb) into one new events
    file in `logdir`."""
    writer = tf.summary.create_file_writer(logdir, filename_suffix=filename_suffix)
    with writer.as_default():
        for summary in summaries:
            tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=0)
    writer.close()


def write_run(workdir: str, values: Mapping[str, Any]) -> None:
    """Writes a run's values (its run_values) and an experiment summary opening on the
    first SHOWN_HPARAMS of KEY_HPARAMS, at the run's root, where TensorBoard pairs them
    with its train/ and validation/ scalars."""
    write(workdir, [
        hp.hparams_pb(dict(values), trial_id=os.path.basename(os.path.abspath(workdir))),
        # No filters: the run does not know the values of the runs beside it.
        experiment_summary([values], KEY_HPARAMS[:SHOWN_HPARAMS], filters=False)])
