"""Before a run downloads or builds anything: every input it names can be had, or one error says which cannot.

Two kinds of needs, checked in this order and reported together:

1. Local inputs, where they are: the folder of --image_dir, the prepared
   dataset in --data_dir, the SavedModel of --hub_handle, the files of --weights
   and --bit_weights, and --workdir (a directory this process can write, or
   create). Nothing is fetched; only directory listings and file headers are read.
2. Remote resources the run would fetch because no local cache holds them (a
   TFDS dataset not prepared, BiT's official .npz, a TF Hub URL, Keras'
   ImageNet weights): their host must resolve. One quick DNS look-up per host,
   which tells an offline machine in seconds what a download's retries take
   minutes to tell; nothing is downloaded here.

Every problem of both kinds goes into one UserError, each naming the flag that
supplies the input and how to do without the network: a mistyped --image_dir is
reported with the BiT weights an offline machine cannot fetch, before any
download is tried, and a run online never downloads hundreds of MB before the
typo is found.

Who needs what is declared where it is known: each backbone's `Spec.needs`
(trainer/backbones/) and `sources.needs` for the data list their `LocalProblem`s
and `Remote`s; this module adds --workdir, collects, resolves hosts and words the
error. The downloads happen later, where they always did (`Spec.check_source`,
`sources.create_data_source`). No TensorFlow at import time: backbone modules
import this one for the two types.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import urllib.parse
from typing import Sequence, Union

from absl import logging

from trainer import backbones
from trainer.config import Config, UserError

GCS_HOST = "storage.googleapis.com"  # where gs:// paths are read from


@dataclasses.dataclass(frozen=True)
class LocalProblem:
    """A local input that cannot be used as given."""

    flag: str  # the flag that names it: "--image_dir"
    message: str  # a sentence naming the flag, its value and what is wrong


@dataclasses.dataclass(frozen=True)
class Remote:
    """A resource the run will fetch (or read) over the network: no local copy was found."""

    flag: str  # the flag that supplies a local copy instead: "--bit_weights"
    what: str  # in a few words: "the BiT weights BiT-S-R50x3.npz"
    url: str
    offline: str  # a sentence: how to run without the network


Need = Union[LocalProblem, Remote]


def host(url: str) -> str | None:
    """The host `url` is fetched from (gs:// paths: Cloud Storage's); None for a local path."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "gs":
        return GCS_HOST
    return parsed.hostname


def writable_directory_problem(flag: str, path: str) -> str | None:
    """Why `path` cannot be a directory this process writes into (it or the nearest
    existing parent it would be created under), or None. Remote paths (`://`) pass."""
    if "://" in path:
        return None
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    where = "" if existing == os.path.abspath(path) else f" ({existing}, where it would be created)"
    if not os.path.isdir(existing):
        return f"{flag}={path} is not writable: {existing} is a file, not a directory."
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{flag}={path} is not writable{where}: permission denied."
    return None


def workdir_needs(workdir: str) -> list[Need]:
    """--workdir: a directory this process can write, or create."""
    problem = writable_directory_problem("--workdir", workdir)
    return [LocalProblem("--workdir", problem)] if problem else []


def _resolving_hosts(remotes: Sequence[Remote]) -> dict[str, bool]:
    """Whether each remote's host resolves, looked up in parallel, once per host."""
    from trainer.data import sources  # imports TensorFlow

    hosts = sorted({host(remote.url) for remote in remotes} - {None})
    if not hosts:
        return {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        return dict(zip(hosts, pool.map(lambda name: sources.host_resolves(f"https://{name}"),
                                        hosts)))


def problems(needs: Sequence[Need]) -> list[str]:
    """The message of every local problem, then of every remote resource whose host does
    not resolve, in the order of `needs`."""
    remotes = [need for need in needs if isinstance(need, Remote)]
    resolves = _resolving_hosts(remotes)
    found = [need.message for need in needs if isinstance(need, LocalProblem)]
    for remote in remotes:
        if not resolves.get(host(remote.url), True):
            found.append(f"{remote.flag}: {remote.what} would be fetched from {remote.url}, but "
                         f"{host(remote.url)} cannot be resolved (this machine looks offline). "
                         f"{remote.offline}")
    return found


def require(needs: Sequence[Need]) -> None:
    """Raises one UserError with every problem of `needs` (see `problems`).

    Raises:
      UserError: a local input cannot be used, or a remote one's host does not resolve.
    """
    found = problems(needs)
    if len(found) == 1:
        raise UserError(found[0])
    if found:
        raise UserError(f"{len(found)} of the run's inputs are missing or unusable: " + " ".join(
            f"({i}) {message}" for i, message in enumerate(found, start=1)))


def check(config: Config) -> None:
    """Checks every input of the run `config` describes, before anything is downloaded or
    built (see the module docstring); logs what the run will fetch.

    Raises:
      UserError: naming the flag of every input that cannot be had.
    """
    from trainer.data import sources  # imports TensorFlow

    needs = [*workdir_needs(config.workdir), *sources.needs(config.data),
             *backbones.spec(config.model.backbone).needs(config.model)]
    require(needs)
    for remote in (need for need in needs if isinstance(need, Remote)):
        logging.info("%s is not here: it will be fetched from %s (%s supplies a local copy).",
                     remote.what[:1].upper() + remote.what[1:], remote.url, remote.flag)
