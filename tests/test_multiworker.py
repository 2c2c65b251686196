"""Two workers on 127.0.0.1, configured by the pods' entry script, train together; a lost peer
ends the survivor with a clear error and both resume."""

import csv
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

import faults

pytestmark = pytest.mark.slow  # two trainer processes, killed and restarted

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRYPOINT = os.path.join(REPO, "scripts", "k8s_entrypoint.sh")
TINY = ["--experiment=smoke", "--strategy=multi_worker", "--synthetic_examples=192", "--image_size=16",
        "--wrn_width=1", "--batch_size=16", "--epochs=2", "--collective_timeout_sec=15",
        "--precision=float32", "--jit_compile=false"]


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(workdir, peer_pauses_at=None, marker=None):
    """Both workers, with the environment an Indexed Job's pods get; the peer (index 1)
    runs through tests/faults.py and pauses at `peer_pauses_at`, if given."""
    hosts = ",".join(f"127.0.0.1:{port}" for port in free_ports(2))
    workers = []
    for index in range(2):
        command = f"{sys.executable} -m trainer.main"
        env = os.environ
        if index == 1 and peer_pauses_at:
            command, env = f"{sys.executable} {faults.SCRIPT}", faults.environment(
                marker, peer_pauses_at)
        env = {**env, "WORKER_HOSTS": hosts, "JOB_COMPLETION_INDEX": str(index),
               "TRAINER_CMD": command}
        env.pop("TF_CONFIG", None)
        workers.append(subprocess.Popen(["bash", ENTRYPOINT, f"--workdir={workdir}", *TINY],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True))
    return workers


def fingerprint(log):
    found = re.findall(r"Final weights fingerprint: (\w+)", log)
    assert found, log[-3000:]
    return found[-1]


def epochs_in_history(workdir):
    if not (workdir / "history.csv").exists():
        return []
    with open(workdir / "history.csv") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def test_lost_peer_ends_the_survivor_then_both_resume_and_only_the_chief_writes(tmp_path):
    workdir = tmp_path / "run"
    marker = tmp_path / "peer-paused"
    chief, other = start_workers(workdir, peer_pauses_at="epoch_begin:2", marker=marker)
    # The peer holds at epoch 2, so the chief cannot pass its first step; the chief saved
    # epoch 1's best checkpoint before (after its history row and its backup).
    best = workdir / "checkpoints" / "best" / "epoch.json"
    faults.wait_for(other, lambda: marker.exists() and (best.exists() or chief.poll() is not None))
    other.send_signal(signal.SIGKILL)  # the peer vanishes (node lost)
    other.wait()
    _, log = chief.communicate(timeout=300)  # a timeout, never a hang
    assert chief.returncode == 4, log[-3000:]
    assert "A peer worker stopped answering" in log and "Traceback" not in log

    workers = start_workers(workdir)
    logs = [w.communicate(timeout=600)[1] for w in workers]
    for worker, log in zip(workers, logs):
        assert worker.returncode == 0, log[-3000:]
        assert re.search(r"Strategy \w+ with 2 replicas", log), log[-3000:]
        assert "Epoch 1/2:" not in log  # resumed from the backup
    assert fingerprint(logs[0]) == fingerprint(logs[1])  # replicas stayed in sync
    assert epochs_in_history(workdir) == [1, 2]
    for name in ("summary.json", "config.json", "export/saved_model.pb", "train", "validation"):
        assert (workdir / name).exists(), name
    assert '"num_replicas": 2' in (workdir / "summary.json").read_text()
    # Keras sends a non-chief's writes to workertemp_* directories and removes them.
    leftovers = [n for _, dirs, files in os.walk(workdir) for n in dirs + files if "workertemp" in n]
    assert not leftovers
