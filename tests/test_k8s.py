"""Kubernetes manifests, image and launch scripts: rendered, validated, scanned, run.

No cluster and no Docker: overlays are rendered with `kubectl kustomize`,
validated against the Kubernetes OpenAPI schemas that `kubernetes-validate`
ships, scanned with checkov (in a tool venv of its own: its pins would
downgrade packages TensorFlow imports), and the entry script and submit.sh
run with stand-ins for the trainer and for kubectl. Every kubectl call gets a
kubeconfig that points at 127.0.0.1, so no test can reach a real cluster.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import require_tool

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = ("gpu", "tpu", "multiworker", "tensorboard", "upload")
ENTRYPOINT = REPO / "scripts" / "k8s_entrypoint.sh"
SUBMIT = REPO / "scripts" / "submit.sh"
JOB_NAME = "bit-finetune"  # the base Job's name, before submit.sh renames it
IMAGE_UID = 10001  # the Dockerfile's user; the pods must run as it
DOCKERFILES = ("Dockerfile", "Dockerfile.tpu")  # NVIDIA GPUs (and CPUs); TPU VMs

# The oldest Kubernetes the manifests support (podFailurePolicy is GA in 1.31)
# and the newest that kubernetes-validate knows.
K8S_VERSIONS = ("1.31.0", kubernetes_validate.utils.latest_version())

# checkov pins old versions of packages TensorFlow shares (packaging, among
# others), so it lives in a venv of its own, made on first use and kept
# across clones in the user's cache; CHECKOV=/path/to/checkov uses another.
CHECKOV_VERSION = "3.3.30"
CHECKOV_VENV = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                / "keras-transfer-trainer" / f"checkov-{CHECKOV_VERSION}")

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
contexts: [{name: none, context: {cluster: none}}]
current-context: none
"""


@pytest.fixture(scope="module")
def kube_env(tmp_path_factory):
    """Environment for kubectl: a kubeconfig whose only cluster is 127.0.0.1."""
    require_tool(shutil.which("kubectl") is not None,
                 "kubectl 1.27 or newer is not installed (https://kubernetes.io/docs/tasks/tools/; "
                 "Debian 12's kubernetes-client is 1.20, too old); it renders the kustomizations.")
    kubeconfig = tmp_path_factory.mktemp("kube") / "config"
    kubeconfig.write_text(KUBECONFIG)
    return {**os.environ, "KUBECONFIG": str(kubeconfig)}


def kustomize(path, env):
    """`kubectl kustomize PATH` as text; fails the test with kubectl's error."""
    result = subprocess.run(["kubectl", "kustomize", str(path)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def rendered(kube_env):
    """Each overlay's manifests: {overlay: (yaml_text, [objects])}."""
    out = {}
    for overlay in OVERLAYS:
        text = kustomize(REPO / "k8s" / "overlays" / overlay, kube_env)
        out[overlay] = (text, [doc for doc in yaml.safe_load_all(text) if doc])
    return out


def objects(docs, kind):
    return [doc for doc in docs if doc["kind"] == kind]


def the(docs, kind):
    [obj] = objects(docs, kind)
    return obj


def pod_specs(docs):
    return [doc["spec"]["template"]["spec"] for doc in docs
            if doc["kind"] in ("Job", "Deployment")]


def container_env(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# Rendering and schema validation.

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly_against_the_kubernetes_schema(rendered, overlay):
    _, docs = rendered[overlay]
    assert docs
    for version in K8S_VERSIONS:
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} is invalid "
                            f"for Kubernetes {version} at {list(e.path)}: {e.message}")


def test_strict_validation_rejects_unknown_fields(rendered):
    """The check above would be vacuous if unknown fields passed."""
    job = json.loads(json.dumps(the(rendered["gpu"][1], "Job")))
    job["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay,kinds", [
    ("gpu", ["Job", "NetworkPolicy", "PersistentVolumeClaim", "PersistentVolumeClaim"]),
    ("tpu", ["Job", "NetworkPolicy", "PersistentVolumeClaim", "PersistentVolumeClaim"]),
    ("multiworker", ["Job", "NetworkPolicy", "PersistentVolumeClaim",
                     "PersistentVolumeClaim", "Service"]),
    ("tensorboard", ["Deployment", "NetworkPolicy", "NetworkPolicy", "PersistentVolumeClaim",
                     "PersistentVolumeClaim", "Service"]),
    ("upload", ["Job", "NetworkPolicy", "NetworkPolicy", "PersistentVolumeClaim",
                "PersistentVolumeClaim"]),
])
def test_overlay_contents(rendered, overlay, kinds):
    docs = rendered[overlay][1]
    assert sorted(doc["kind"] for doc in docs) == kinds
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "keras-transfer-trainer"


# What every pod must do.

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_locked_down(rendered, overlay):
    for spec in pod_specs(rendered[overlay][1]):
        assert spec["automountServiceAccountToken"] is False
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True
        assert pod_security["runAsUser"] == IMAGE_UID
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for container in spec["containers"] + spec.get("initContainers", []):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"] == {"drop": ["ALL"]}
            assert not security.get("privileged")
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), bound
            # A read-only root needs somewhere to write: HOME on the /tmp emptyDir.
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert "emptyDir" in volumes[mounts["/tmp"]]
            assert container_env(container)["HOME"] == "/tmp"
            if overlay == "upload":  # it writes only data: the data volume, not the runs
                assert "/runs" not in mounts
                path, claim = "/data", "trainer-data"
            else:  # the runs volume: read-write for trainers, read-only for TensorBoard
                path, claim = "/runs", "trainer-runs"
            assert volumes[mounts[path]]["persistentVolumeClaim"]["claimName"] == claim


def test_no_service_is_exposed_outside_the_cluster(rendered):
    for _, docs in rendered.values():
        for service in objects(docs, "Service"):
            assert service["spec"].get("type", "ClusterIP") == "ClusterIP"


@pytest.mark.parametrize("overlay", ["gpu", "tpu", "multiworker"])
def test_jobs_resume_after_preemption_and_stop_on_usage_errors(rendered, overlay):
    docs = rendered[overlay][1]
    job = the(docs, "Job")
    spec = job["spec"]["template"]["spec"]
    [trainer] = spec["containers"]
    assert trainer["name"] == "trainer"
    # podFailurePolicy needs restartPolicy Never; retries are new pods.
    assert spec["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] >= 3
    # The trainer's exit codes: 2 usage error, 3 diverged (both fail the Job),
    # 4 lost a multi-worker peer (retried: restarting resumes), 143 SIGTERM.
    fail_codes = [2, 3]
    fail_rule, sigterm_rule, disruption_rule = job["spec"]["podFailurePolicy"]["rules"]
    assert fail_rule == {"action": "FailJob", "onExitCodes": {
        "containerName": "trainer", "operator": "In", "values": fail_codes}}
    assert sigterm_rule == {"action": "Ignore", "onExitCodes": {
        "containerName": "trainer", "operator": "In", "values": [143]}}
    assert disruption_rule == {"action": "Ignore", "onPodConditions": [
        {"type": "DisruptionTarget", "status": "True"}]}
    # The workdir is named after the Job, so a replacement pod resumes it.
    assert "--workdir=/runs/$(JOB_NAME)" in trainer["args"]
    env = container_env(trainer)
    assert env["JOB_NAME"] == {"fieldRef": {
        "fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}
    assert "--experiment=bit_hyperrule" in trainer["args"]
    # Data and the TF Hub cache on the data volume; /dev/shm in memory.
    mounts = {m["mountPath"]: m["name"] for m in trainer["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "trainer-data"
    assert env["TFHUB_CACHE_DIR"].startswith("/data/")
    assert env["TFDS_DATA_DIR"].startswith("/data/")
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "command" not in trainer  # the image's entry point runs the trainer


def test_gpu_job_asks_for_gpus(rendered):
    [trainer] = the(rendered["gpu"][1], "Job")["spec"]["template"]["spec"]["containers"]
    assert trainer["args"][-1] == "--strategy=mirrored"
    gpus = trainer["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus >= 1 and trainer["resources"]["requests"]["nvidia.com/gpu"] == gpus


def test_tpu_job_asks_for_a_tpu_slice(rendered):
    spec = the(rendered["tpu"][1], "Job")["spec"]["template"]["spec"]
    [trainer] = spec["containers"]
    assert trainer["args"][-3:] == ["--strategy=tpu", "--tpu=local", "--precision=mixed_bfloat16"]
    assert {"cloud.google.com/gke-tpu-accelerator", "cloud.google.com/gke-tpu-topology"} \
        <= set(spec["nodeSelector"])
    chips = trainer["resources"]["limits"]["google.com/tpu"]
    assert chips >= 1 and trainer["resources"]["requests"]["google.com/tpu"] == chips
    # The chips a topology has: 2x2 -> 4.
    topology = spec["nodeSelector"]["cloud.google.com/gke-tpu-topology"]
    assert chips == eval("*".join(topology.split("x")))  # noqa: S307  digits and 'x' only


def test_multiworker_job_and_service_agree(rendered):
    docs = rendered["multiworker"][1]
    job, service = the(docs, "Job"), the(docs, "Service")
    spec = job["spec"]["template"]["spec"]
    [trainer] = spec["containers"]
    env = container_env(trainer)
    workers = job["spec"]["completions"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["parallelism"] == workers == int(env["WORKER_REPLICAS"])
    assert trainer["args"][-1] == "--strategy=multi_worker"
    assert spec["subdomain"] == env["WORKER_SERVICE"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    [port] = trainer["ports"]
    assert port["containerPort"] == int(env["WORKER_PORT"]) == service["spec"]["ports"][0]["port"]
    # Only trainers may reach the unauthenticated collective port.
    policy = the(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": port["containerPort"]}]


def test_tensorboard_reads_the_runs_volume_through_a_cluster_ip(rendered):
    docs = rendered["tensorboard"][1]
    deployment, service = the(docs, "Deployment"), the(docs, "Service")
    spec = deployment["spec"]["template"]["spec"]
    [tensorboard] = spec["containers"]
    assert tensorboard["command"] == ["tensorboard"]
    assert "--logdir=/runs" in tensorboard["args"]
    [runs_mount] = [m for m in tensorboard["volumeMounts"] if m["mountPath"] == "/runs"]
    assert runs_mount["readOnly"] is True
    [runs] = [v for v in spec["volumes"] if v["name"] == runs_mount["name"]]
    assert runs["persistentVolumeClaim"] == {"claimName": "trainer-runs", "readOnly": True}
    assert tensorboard["readinessProbe"]["httpGet"]["port"] == "http"
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # No pod may connect to it: only port-forward and the kubelet's probes.
    [policy] = [p for p in objects(docs, "NetworkPolicy") if p["metadata"]["name"] == "tensorboard"]
    assert policy["spec"]["policyTypes"] == ["Ingress"] and not policy["spec"].get("ingress")


def test_the_upload_pod_only_waits_and_stops_on_its_own(rendered):
    """scripts/submit.sh copies into it with `kubectl exec` and deletes it; one left behind
    stops at its deadline, and is never retried."""
    docs = rendered["upload"][1]
    job = the(docs, "Job")
    spec = job["spec"]["template"]["spec"]
    [loader] = spec["containers"]
    assert loader["command"][0] == "sleep"
    assert 0 < job["spec"]["activeDeadlineSeconds"] <= int(loader["command"][1])
    assert job["spec"]["backoffLimit"] == 0 and spec["restartPolicy"] == "Never"
    # The trainers' user, so that they own what it writes; no accelerator.
    assert spec["securityContext"]["fsGroup"] == IMAGE_UID
    assert set(loader["resources"]["limits"]) == {"cpu", "memory"}
    # No connection in or out: `kubectl exec` goes through the kubelet.
    [policy] = [p for p in objects(docs, "NetworkPolicy") if p["metadata"]["name"] == "data-upload"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() \
        <= job["spec"]["template"]["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert not policy["spec"].get("ingress") and not policy["spec"].get("egress")


# Security scan.

def checkov_executable():
    """checkov from $CHECKOV, else from its own venv, installed on first use (~1 min)."""
    if os.environ.get("CHECKOV"):
        return os.environ["CHECKOV"]
    executable = CHECKOV_VENV / "bin" / "checkov"
    installed = CHECKOV_VENV / ".installed"  # written last: a half-made venv is redone
    if not installed.exists():
        shutil.rmtree(CHECKOV_VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(CHECKOV_VENV)], check=True)
        result = subprocess.run(
            [str(CHECKOV_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet",
             "--disable-pip-version-check", f"checkov=={CHECKOV_VERSION}"],
            capture_output=True, text=True, timeout=900)
        require_tool(result.returncode == 0,
                     f"could not install checkov {CHECKOV_VERSION} from the package index into "
                     f"{CHECKOV_VENV} (offline? set CHECKOV=/path/to/checkov):\n"
                     f"{result.stderr[-3000:]}")
        installed.touch()
    return str(executable)


@pytest.mark.slow
def test_checkov_finds_nothing_and_every_skip_has_a_reason(rendered, tmp_path):
    for overlay, (text, _) in rendered.items():
        (tmp_path / f"{overlay}.yaml").write_text(text)
    for dockerfile in DOCKERFILES:
        shutil.copy(REPO / dockerfile, tmp_path / dockerfile)
    result = subprocess.run(
        # --skip-download and the update-check switch keep checkov offline.
        [checkov_executable(), "--directory", str(tmp_path), "--framework", "kubernetes",
         "dockerfile", "--skip-download", "--compact", "--output", "json"],
        env={**os.environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true"},
        capture_output=True, text=True, timeout=300)
    try:
        reports = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    reports = {report["check_type"]: report for report in
               (reports if isinstance(reports, list) else [reports])}
    assert set(reports) == {"kubernetes", "dockerfile"}
    # Every object was read (checkov also counts each container as one).
    resources = sum(len(docs) for _, docs in rendered.values())
    assert reports["kubernetes"]["summary"]["resource_count"] >= resources
    for report in reports.values():
        summary = report["summary"]
        failed = [f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
                  for c in report["results"]["failed_checks"]]
        assert summary["failed"] == 0, "checkov found:\n" + "\n".join(failed)
        assert summary["parsing_errors"] == 0 and summary["passed"] > 0
        for check in report["results"].get("skipped_checks", []):
            reason = check["check_result"].get("suppress_comment") or ""
            assert len(reason.split()) >= 5, f"{check['check_id']} on {check['resource']} " \
                                             f"is skipped without a reason: {reason!r}"
    assert result.returncode == 0


def test_skips_are_written_where_a_reader_sees_them():
    """Each skip annotation or comment is in a source file, next to a comment saying why."""
    for path in [*REPO.glob("k8s/**/*.yaml"), *(REPO / name for name in DOCKERFILES)]:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if re.search(r"checkov(\.io/skip\d+:|:skip=)", line):
                above = [ln for ln in lines[:number] if ln.strip().startswith("#")]
                assert above, f"{path}:{number + 1}: a skipped check without a comment above"


# The images.

def dockerfile_instructions(name):
    text = (REPO / name).read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def readme_commands():
    """Every command line in a fenced code block of README.md and docs/install.md (the
    install commands users are given), without its comment."""
    docs = [REPO / "README.md", REPO / "docs" / "install.md"]
    assert all(doc.exists() for doc in docs), "the install commands the images use are missing"
    fenced, commands = False, []
    for line in "\n".join(doc.read_text() for doc in docs).splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            commands.append(re.sub(r"^\$\s+", "", line.split(" #")[0].strip()))
    return commands


def pip_installs(command):
    """The arguments of each `pip install` in a command line (which may chain with &&)."""
    return [shlex.split(part)[2:] for part in command.split("&&")
            if shlex.split(part)[:2] == ["pip", "install"]]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_install_the_trainer_as_the_readme_says_without_the_test_tools(dockerfile):
    installs = [line for line in dockerfile_instructions(dockerfile)
                if line.startswith("RUN") and "pip install" in line]
    assert len(installs) == 1, installs
    command = installs[0][len("RUN "):]
    assert command in readme_commands(), f"{dockerfile}'s install is not a command of the install docs"
    packages = [arg for args in pip_installs(command) for arg in args
                if arg == "." or arg.startswith(".[")]
    assert packages, f"{dockerfile} does not install the package itself"
    for package in packages:
        extras = set(package[2:-1].split(",")) if package.startswith(".[") else set()
        assert extras <= {"tpu"}, f"{dockerfile} installs {package}: only what the trainer needs"


def test_the_tpu_image_puts_the_tpu_build_the_extra_pins_over_tensorflow():
    """tf-keras needs the `tensorflow` distribution too; both provide the `tensorflow`
    module, so the TPU build is installed again, last, at the version the extra pins."""
    [extra] = re.findall(r'"tpu": \[([^\]]*)\]', (REPO / "setup.py").read_text())
    pins = dict(re.findall(r'"([\w-]+)==([\w.]+)"', extra))
    assert {"tensorflow", "tensorflow-tpu", "libtpu"} <= set(pins)
    assert pins["tensorflow"] == pins["tensorflow-tpu"]
    [install] = [line for line in dockerfile_instructions("Dockerfile.tpu")
                 if line.startswith("RUN") and "pip install" in line]
    first, last = pip_installs(install[len("RUN "):])
    assert first == [".[tpu]"]
    assert last == ["--no-deps", "--force-reinstall", f"tensorflow-tpu=={pins['tensorflow-tpu']}"]


def test_the_gpu_extra_brings_cuda_for_the_tensorflow_the_package_requires():
    """`pip install -e ".[gpu]"`: the CUDA wheels of the same TensorFlow range, so the extra
    can never pull another TensorFlow than the package itself allows."""
    setup = (REPO / "setup.py").read_text()
    [required] = re.findall(r'"tensorflow(>=[^"]+)"', setup)
    [extra] = re.findall(r'"gpu": \[(.*)\]', setup)  # one line
    assert extra.strip() == f'"tensorflow[and-cuda]{required}"'


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_run_the_entry_script_as_the_pods_user(dockerfile):
    instructions = dockerfile_instructions(dockerfile)
    assert f"USER {IMAGE_UID}:{IMAGE_UID}" in instructions
    assert "WORKDIR /app" in instructions
    [entrypoint] = [line for line in instructions if line.startswith("ENTRYPOINT")]
    assert json.loads(entrypoint.split(None, 1)[1]) == ["/app/" + str(ENTRYPOINT.relative_to(REPO))]
    for script in (ENTRYPOINT, SUBMIT):
        assert os.access(script, os.X_OK), f"{script} is not executable"


def test_dockerignore_keeps_what_the_install_needs():
    ignored = (REPO / ".dockerignore").read_text().split()
    for needed in ("setup.py", "trainer", "scripts", "README.md"):
        assert needed not in ignored


# The entry script: TF_CONFIG for each worker.

SHIM = """#!/bin/sh
# Stands in for the trainer: prints TF_CONFIG, then each argument, one a line.
printf '%s\\n' "${TF_CONFIG-<unset>}"
for arg in "$@"; do printf '%s\\n' "$arg"; done
exit "${SHIM_EXIT:-0}"
"""


@pytest.fixture
def fake_trainer(tmp_path):
    shim = tmp_path / "fake_trainer"
    shim.write_text(SHIM)
    shim.chmod(0o755)
    return str(shim)


def run_entrypoint(fake_trainer, env, args=()):
    """Runs the entry script; returns (exit code, TF_CONFIG or None, trainer args, stderr)."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("TF_CONFIG", "WORKER_HOSTS", "WORKER_REPLICAS", "JOB_NAME",
                         "WORKER_SERVICE", "WORKER_PORT", "JOB_COMPLETION_INDEX")}
    result = subprocess.run([str(ENTRYPOINT), *args], capture_output=True, text=True, timeout=30,
                            env={**base, "TRAINER_CMD": fake_trainer, **env})
    lines = result.stdout.splitlines()
    tf_config = json.loads(lines[0]) if lines and lines[0] != "<unset>" else None
    return result.returncode, tf_config, lines[1:], result.stderr


def test_entrypoint_builds_tf_config_from_a_host_list(fake_trainer):
    """How a local two-process test runs the workers: the same list, its own index."""
    hosts = ["127.0.0.1:23456", "127.0.0.1:23457"]
    for index in (0, 1):
        code, tf_config, args, _ = run_entrypoint(
            fake_trainer, {"WORKER_HOSTS": ",".join(hosts), "JOB_COMPLETION_INDEX": str(index)},
            ["--strategy=multi_worker", "--workdir=/a dir/with spaces"])
        assert code == 0
        assert tf_config == {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
        assert args == ["--strategy=multi_worker", "--workdir=/a dir/with spaces"]


def test_entrypoint_builds_tf_config_from_the_indexed_job(fake_trainer):
    env = {"WORKER_REPLICAS": "3", "JOB_NAME": "run7", "WORKER_SERVICE": "workers",
           "WORKER_PORT": "2222"}
    configs = [run_entrypoint(fake_trainer, {**env, "JOB_COMPLETION_INDEX": str(i)})[1]
               for i in range(3)]
    hosts = ["run7-0.workers:2222", "run7-1.workers:2222", "run7-2.workers:2222"]
    assert [c["cluster"]["worker"] for c in configs] == [hosts] * 3
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]


def test_entrypoint_without_workers_just_runs_the_trainer(fake_trainer):
    code, tf_config, args, _ = run_entrypoint(fake_trainer, {}, ["--epochs=1"])
    assert (code, tf_config, args) == (0, None, ["--epochs=1"])
    # A TF_CONFIG given from outside (a Kubeflow TFJob, say) is left alone.
    given = {"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}
    code, tf_config, _, _ = run_entrypoint(fake_trainer, {"TF_CONFIG": json.dumps(given)})
    assert (code, tf_config) == (0, given)


def test_entrypoint_passes_the_trainers_exit_code_on(fake_trainer):
    """The Job's podFailurePolicy reads the trainer's exit code: exec, no wrapper's."""
    assert run_entrypoint(fake_trainer, {"SHIM_EXIT": "2"})[0] == 2
    assert run_entrypoint(fake_trainer, {"SHIM_EXIT": "7"})[0] == 7


@pytest.mark.parametrize("env,message", [
    ({"WORKER_HOSTS": "a:1,b:2"}, "JOB_COMPLETION_INDEX"),
    ({"WORKER_HOSTS": "a:1,b:2", "JOB_COMPLETION_INDEX": "2"}, "only 2 workers"),
    ({"WORKER_HOSTS": "a:1,b", "JOB_COMPLETION_INDEX": "0"}, "not host:port"),
    ({"WORKER_HOSTS": 'a:1,"b:2', "JOB_COMPLETION_INDEX": "0"}, "not host:port"),
    ({"WORKER_REPLICAS": "2", "WORKER_SERVICE": "s", "JOB_COMPLETION_INDEX": "0"}, "JOB_NAME"),
    ({"WORKER_REPLICAS": "2", "JOB_NAME": "j", "JOB_COMPLETION_INDEX": "0"}, "WORKER_SERVICE"),
    ({"WORKER_REPLICAS": "0", "JOB_NAME": "j", "WORKER_SERVICE": "s",
      "JOB_COMPLETION_INDEX": "0"}, "positive"),
    ({"WORKER_REPLICAS": "2", "JOB_NAME": "j", "WORKER_SERVICE": "s", "WORKER_PORT": "http",
      "JOB_COMPLETION_INDEX": "0"}, "port"),
    ({"WORKER_HOSTS": "a:1", "JOB_COMPLETION_INDEX": "0", "TF_CONFIG": "{}"}, "only one"),
])
def test_entrypoint_rejects_a_bad_configuration_as_a_usage_error(fake_trainer, env, message):
    code, tf_config, _, stderr = run_entrypoint(fake_trainer, env)
    assert code == 2 and tf_config is None  # 2: the Job fails at once, no retries
    assert message in stderr


def simulate_pods(job, env=None):
    """What the Indexed Job's pods would run: the container's env, as Kubernetes fills it."""
    spec = job["spec"]["template"]["spec"]
    [trainer] = spec["containers"]
    pods = []
    for index in range(job["spec"]["completions"]):
        pod_env = {k: v for k, v in container_env(trainer).items() if isinstance(v, str)}
        pod_env["JOB_NAME"] = job["metadata"]["name"]  # the downward API's job-name label
        pod_env["JOB_COMPLETION_INDEX"] = str(index)  # set by the Indexed Job
        # Kubernetes expands $(VAR) in args from the container's env.
        args = [re.sub(r"\$\((\w+)\)", lambda m: pod_env[m.group(1)], a) for a in trainer["args"]]
        pods.append((pod_env, args, f"{pod_env['JOB_NAME']}-{index}.{spec['subdomain']}"))
    return pods


def check_pods_get_one_cluster(job, fake_trainer):
    pods = simulate_pods(job)
    clusters = []
    for index, (env, args, hostname) in enumerate(pods):
        code, tf_config, trainer_args, stderr = run_entrypoint(fake_trainer, env, args)
        assert code == 0, stderr
        assert trainer_args == args
        assert tf_config["task"] == {"type": "worker", "index": index}
        # Each pod is in the list under the name DNS gives it.
        assert tf_config["cluster"]["worker"][index] == f"{hostname}:{env['WORKER_PORT']}"
        assert f"--workdir=/runs/{job['metadata']['name']}" in args
        clusters.append(tf_config["cluster"])
    assert len(clusters) == len(pods) >= 2 and all(c == clusters[0] for c in clusters)


def test_multiworker_pods_each_get_the_same_cluster_and_their_own_index(rendered, fake_trainer):
    check_pods_get_one_cluster(the(rendered["multiworker"][1], "Job"), fake_trainer)


# submit.sh

def submit(args, env, check=True):
    result = subprocess.run([str(SUBMIT), *args], env=env, capture_output=True, text=True,
                            timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_submit_dry_run_renders_the_run(kube_env, fake_trainer):
    result = submit(["multiworker", "--image=registry.example:5000/team/ktt:v3", "--name=flowers-7",
                     "--workers=3", "--dry-run", "--", "--epochs=10", "--learning_rate=1e-5",
                     '--note=a "quoted" \\ value: with # yaml'], kube_env)
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    job = the(docs, "Job")
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    [trainer] = job["spec"]["template"]["spec"]["containers"]
    assert job["metadata"]["name"] == "flowers-7"
    assert trainer["image"] == "registry.example:5000/team/ktt:v3"
    assert trainer["args"][-4:] == ["--strategy=multi_worker", "--epochs=10", "--learning_rate=1e-5",
                                    '--note=a "quoted" \\ value: with # yaml']
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    assert container_env(trainer)["WORKER_REPLICAS"] == "3"
    # The volumes and the workers' Service keep their names: runs share them.
    assert the(docs, "Service")["metadata"]["name"] == "trainer-workers"
    assert {p["metadata"]["name"] for p in objects(docs, "PersistentVolumeClaim")} \
        == {"trainer-runs", "trainer-data"}
    check_pods_get_one_cluster(job, fake_trainer)


def test_submit_tensorboard_sets_its_image(kube_env):
    result = submit(["tensorboard", "--image=reg/ktt@sha256:" + "0" * 64, "--dry-run"], kube_env)
    deployment = the([d for d in yaml.safe_load_all(result.stdout) if d], "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "reg/ktt@sha256:" + "0" * 64


def test_submit_applies_and_says_how_to_watch(kube_env, tmp_path):
    """With a stand-in kubectl that records the call and renders what it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "kubectl"
    fake.write_text(f"""#!/bin/sh
printf '%s\\n' "$@" > {tmp_path}/args
exec {shutil.which('kubectl')} kustomize "$3" > {tmp_path}/applied.yaml
""")
    fake.chmod(0o755)
    result = submit(["gpu", "--image=reg/ktt:1", "--name=run-a", "--", "--epochs=2"],
                    {**kube_env, "KUBECTL": str(fake)})
    args = (tmp_path / "args").read_text().split()
    assert args[:2] == ["apply", "-k"] and len(args) == 3
    job = the([d for d in yaml.safe_load_all((tmp_path / "applied.yaml").read_text()) if d], "Job")
    assert job["metadata"]["name"] == "run-a"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "--epochs=2"
    assert not Path(args[2]).exists()  # the temporary kustomization is cleaned up
    assert "kubectl logs -f job/run-a" in result.stdout
    assert "kubectl port-forward service/tensorboard 6006:6006" in result.stdout


def test_submit_names_runs_uniquely_by_default(kube_env):
    result = submit(["gpu", "--image=reg/ktt:1", "--dry-run"], kube_env)
    name = the([d for d in yaml.safe_load_all(result.stdout) if d], "Job")["metadata"]["name"]
    assert re.fullmatch(r"bit-finetune-\d{8}-\d{6}", name)


FAKE_KUBECTL_FOR_UPLOAD = """#!{python}
# Stands in for kubectl: records each call; `apply -k` renders what it was given; `exec`
# runs the command here, on a folder that stands in for the pod's /data.
import os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["CALLS"], "a") as calls:
    calls.write(" ".join(args) + "\\n")
if args[:2] == ["apply", "-k"]:
    with open(os.environ["APPLIED"], "w") as applied:
        subprocess.run([{kubectl!r}, "kustomize", args[2]], stdout=applied, check=True)
elif args[0] == "exec":
    command = args[args.index("--") + 1:]
    root = os.environ["VOLUME"]
    sys.exit(subprocess.run([a.replace("/data/", root + "/data/") for a in command]).returncode)
"""


def test_submit_uploads_a_folder_to_the_data_volume_and_deletes_its_pod(kube_env, tmp_path):
    photos = tmp_path / "my_photos"
    files = {"roses/a.jpg": b"rose", "roses/b.jpg": b"rose 2", "tulips/c d.png": b"tulip"}
    for name, data in files.items():
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(data)
    fake = tmp_path / "kubectl"
    fake.write_text(FAKE_KUBECTL_FOR_UPLOAD.format(python=sys.executable,
                                                   kubectl=shutil.which("kubectl")))
    fake.chmod(0o755)
    volume, calls = tmp_path / "volume", tmp_path / "calls"
    env = {**kube_env, "KUBECTL": str(fake), "CALLS": str(calls), "VOLUME": str(volume),
           "APPLIED": str(tmp_path / "applied.yaml")}

    result = submit(["upload", "--image=reg/ktt:1", str(photos)], env)
    copied = volume / "data" / "images" / "my_photos"
    assert {str(p.relative_to(copied)): p.read_bytes() for p in copied.rglob("*.*")} == files
    assert os.listdir(copied.parent) == ["my_photos"]  # no half-copied folder left
    assert "-- --image_dir=/data/images/my_photos" in result.stdout
    job = the([d for d in yaml.safe_load_all((tmp_path / "applied.yaml").read_text()) if d], "Job")
    name = job["metadata"]["name"]
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "reg/ktt:1"
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("apply -k ") and f"job/{name}" in lines[1]
    assert lines[-1] == f"delete job {name} --ignore-not-found"

    # The same name again: refused before anything is copied; the pod is deleted all the same.
    calls.unlink()
    result = submit(["upload", "--image=reg/ktt:1", str(photos)], env, check=False)
    assert result.returncode == 2 and "already on the data volume" in result.stderr
    lines = calls.read_text().splitlines()
    assert not [line for line in lines if line.startswith("exec -i")]
    assert lines[-1].startswith("delete job data-upload-")


@pytest.mark.parametrize("mode,gpus,workers", [("gpu", 4, None), ("multiworker", 2, 3)])
def test_submit_sets_the_gpus_of_each_pod(kube_env, mode, gpus, workers):
    args = [mode, "--image=reg/ktt:1", f"--gpus={gpus}", "--dry-run"]
    result = submit(args + ([f"--workers={workers}"] if workers else []), kube_env)
    job = the([d for d in yaml.safe_load_all(result.stdout) if d], "Job")
    kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)
    [trainer] = job["spec"]["template"]["spec"]["containers"]
    assert trainer["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert trainer["resources"]["limits"]["memory"] == trainer["resources"]["requests"]["memory"]
    if workers:
        assert job["spec"]["completions"] == workers


def test_the_kustomization_of_your_own_in_the_k8s_readme_sets_what_submit_sets(kube_env, tmp_path):
    """k8s/README.md, "Without submit.sh": its kustomization, on this repository's overlay,
    runs the user's image on 4 GPUs with their flags under their run's name."""
    text = (REPO / "k8s" / "README.md").read_text()
    [block] = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "kind: Kustomization" in b]
    kustomization = yaml.safe_load(block)
    [resource] = kustomization["resources"]
    assert resource.endswith("/k8s/overlays/gpu")
    overlay = REPO.resolve() / "k8s" / "overlays" / "gpu"
    kustomization["resources"] = [os.path.relpath(overlay, tmp_path.resolve())]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    docs = [d for d in yaml.safe_load_all(kustomize(tmp_path, kube_env)) if d]
    job = the(docs, "Job")
    [trainer] = job["spec"]["template"]["spec"]["containers"]
    [image] = kustomization["images"]
    assert trainer["image"] == f"{image['newName']}:{image['newTag']}"
    assert trainer["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert trainer["args"][-1] == "--image_dir=/data/images/my_photos"
    assert job["metadata"]["name"] == "photos-1"
    # The run shares the volumes every run uses.
    assert {p["metadata"]["name"] for p in objects(docs, "PersistentVolumeClaim")} \
        == {"trainer-runs", "trainer-data"}


@pytest.mark.parametrize("args,message", [
    (["gpu"], "--image"),
    (["gpu", "--image=reg/ktt"], "no tag"),
    (["gpu", "--image=reg/ktt:latest"], "latest"),
    (["gpu", "--image=reg/ktt:1", "--name=Not_A_DNS_Name"], "--name"),
    (["gpu", "--image=reg/ktt:1", "--workers=2"], "multiworker"),
    (["multiworker", "--image=reg/ktt:1", "--workers=0"], "positive"),
    (["cpu", "--image=reg/ktt:1"], "unknown mode"),
    (["gpu", "--image=reg/ktt:1", "--epochs=3"], "after --"),
    (["tensorboard", "--image=reg/ktt:1", "--", "--epochs=3"], "only"),
    (["gpu", "--image=reg/ktt:1", "--gpus=0"], "--gpus=0"),
    (["gpu", "--image=reg/ktt:1", "--gpus=two"], "--gpus=two"),
    (["multiworker", "--image=reg/ktt:1", "--gpus=-1"], "--gpus=-1"),
    (["tpu", "--image=reg/ktt:1", "--gpus=2"], "gpu and multiworker"),
    (["tensorboard", "--image=reg/ktt:1", "--gpus=1"], "gpu and multiworker"),
    (["upload", "--image=reg/ktt:1"], "name the folder"),
    (["upload", "--image=reg/ktt:1", "/nonexistent/photos"], "not a folder"),
    (["upload", "--image=reg/ktt:1", str(REPO / "k8s" / "base")], "no sub-folders"),
    (["upload", "--image=reg/ktt:1", "--name=../runs", str(REPO / "k8s")], "--name"),
    (["upload", "--image=reg/ktt:1", str(REPO / "k8s"), "--", "--epochs=3"], "only"),
    (["gpu", "--image=reg/ktt:1", str(REPO / "k8s")], "after --"),
])
def test_submit_rejects_bad_usage(kube_env, args, message):
    result = submit(args + ["--dry-run"], kube_env, check=False)
    assert result.returncode == 2 and message in result.stderr
