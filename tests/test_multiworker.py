"""Two workers on 127.0.0.1, configured as the multi-worker pods are, train together."""

import os
import re
import socket
import subprocess
import sys


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRYPOINT = os.path.join(REPO, "scripts", "k8s_entrypoint.sh")
TINY = ["--experiment=smoke", "--strategy=multi_worker", "--synthetic_examples=320", "--image_size=16",
        "--wrn_width=1", "--batch_size=16", "--epochs=2", "--collective_timeout_sec=60"]


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(workdir, extra=()):
    hosts = ",".join(f"127.0.0.1:{port}" for port in free_ports(2))
    workers = []
    for index in range(2):
        env = {**os.environ, "WORKER_HOSTS": hosts, "JOB_COMPLETION_INDEX": str(index),
               "TRAINER_CMD": f"{sys.executable} -m trainer.main"}
        env.pop("TF_CONFIG", None)
        workers.append(subprocess.Popen(["bash", ENTRYPOINT, f"--workdir={workdir}", *TINY, *extra],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True))
    return workers


def fingerprint(log):
    found = re.findall(r"Final weights fingerprint: (\w+)", log)
    assert found, log[-3000:]
    return found[-1]


def test_two_workers_train_together_and_only_the_chief_writes(tmp_path):
    workdir = tmp_path / "run"
    workers = start_workers(workdir)
    logs = [w.communicate(timeout=600)[1] for w in workers]
    for worker, log in zip(workers, logs):
        assert worker.returncode == 0, log[-3000:]
        assert re.search(r"Strategy \w+ with 2 replicas", log), log[-3000:]
    assert fingerprint(logs[0]) == fingerprint(logs[1])
    for name in ("summary.json", "history.csv", "config.json", "export/saved_model.pb",
                 "train", "validation"):
        assert (workdir / name).exists(), name
    assert '"num_replicas": 2' in (workdir / "summary.json").read_text()
    # Keras sends a non-chief's writes to workertemp_* directories and removes them.
    leftovers = [os.path.join(d, n) for d, dirs, files in os.walk(workdir) for n in dirs + files
                 if "workertemp" in n]
    assert not leftovers
