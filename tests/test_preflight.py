"""Preflight: every local input checked and every remote one resolved before anything is
downloaded or built, all problems in one error naming their flags. Offline is simulated by
patching the DNS look-up: no test contacts any address."""

import pytest
import tensorflow_datasets as tfds
import tf_keras as keras

from conftest import run_main
from trainer import checks, preflight
from trainer import config as config_lib
from trainer.backbones import bit_weights, hub, resnet50
from trainer.config import ModelConfig, UserError
from trainer.data import sources


@pytest.fixture
def downloads(monkeypatch, tmp_path):
    """Offline, with an empty Keras cache; records every download attempted."""
    attempted = []

    def record(name):
        def fetch(*args, **kwargs):
            attempted.append(name)
            raise AssertionError(f"{name} was called")
        return fetch

    monkeypatch.setattr(sources, "host_resolves", lambda url: False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KERAS_HOME", raising=False)
    monkeypatch.setattr(keras.utils, "get_file", record("keras.utils.get_file"))
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                        record("download_and_prepare"))
    return attempted


@pytest.mark.parametrize("data_flags, flag", [
    (["--image_dir=/nonexistent/flower_photos"], "--image_dir"),
    (["--dataset=tf_flowers", "--data_dir=EMPTY"], "--data_dir"),
], ids=["image_dir", "data_dir"])
def test_default_backbone_offline_names_the_data_flag_before_any_download(
        data_flags, flag, downloads, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    argv = [f.replace("EMPTY", str(tmp_path / "empty")) for f in data_flags]
    code, _, err = run_main([*argv, f"--workdir={tmp_path / 'run'}"], capsys)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert flag in err
    # The BiT weights it could not fetch offline are named in the same error.
    assert err.index(flag) < err.index("--bit_weights") and "looks offline" in err
    assert downloads == []
    assert not (tmp_path / "run").exists()  # nothing made either


def tiny(**values):
    return checks.resolve(config_lib.override(config_lib.Config(), {
        "image_size": 32, **values}))


def test_every_missing_input_is_reported_together_each_with_its_flag(downloads, tmp_path):
    (tmp_path / "file").write_text("")
    config = tiny(backbone="resnet50", weights=str(tmp_path / "w.h5"),
                  image_dir=str(tmp_path / "photos"), workdir=str(tmp_path / "file" / "run"))
    with pytest.raises(UserError) as raised:
        preflight.check(config)
    message = str(raised.value)
    assert message.startswith("3 of the run's inputs are missing or unusable: (1) ")
    for flag in ("--workdir", "--image_dir", "--weights"):
        assert f"{flag}=" in message, flag
    assert "\n" not in message and downloads == []


def test_offline_remote_inputs_name_the_flag_that_supplies_a_local_copy(downloads, tmp_path,
                                                                      image_dir):
    for values, flag in (({"backbone": "resnet50", "weights": "imagenet"}, "--weights"),
                         ({"backbone": "resnet50_hub"}, "--hub_handle"),
                         ({"backbone": "bit"}, "--bit_weights"),
                         ({"backbone": "wide_resnet", "image_dir": None,
                           "dataset": "tf_flowers"}, "--data_dir")):
        config = tiny(**{"image_dir": image_dir, "workdir": str(tmp_path / "run"), **values})
        with pytest.raises(UserError, match=f"^{flag}: .* cannot be resolved .*Offline, "):
            preflight.check(config)
    assert downloads == []


def test_local_copies_and_caches_need_no_network(tmp_path, monkeypatch, image_dir,
                                                 tiny_hub_model):
    monkeypatch.setattr(sources, "host_resolves", lambda url: pytest.fail(f"looked up {url}"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    cached = tmp_path / "keras" / "models" / "BiT-S-R50x3.npz"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")  # present: the later check reads it, preflight does not
    for values in ({"backbone": "bit"}, {"backbone": "bit", "bit_weights": "none"},
                   {"backbone": "hub", "hub_handle": tiny_hub_model},
                   {"backbone": "resnet50", "weights": "none"},
                   {"backbone": "wide_resnet", "image_dir": None, "dataset": "synthetic"}):
        preflight.check(tiny(**{"image_dir": image_dir, "workdir": str(tmp_path / "run"),
                                **values}))


def test_local_weights_and_handles_are_checked_where_they_are(tmp_path):
    (tmp_path / "bad.npz").write_text("not an archive")
    (tmp_path / "not_a_model").mkdir()
    for needs, flag, words in (
            (bit_weights.needs(ModelConfig(bit_weights=str(tmp_path / "bad.npz"))),
             "--bit_weights", "not an .npz file"),
            (hub.needs(ModelConfig(backbone="hub", hub_handle=str(tmp_path / "not_a_model"))),
             "--hub_handle", "no saved_model.pb"),
            (resnet50.needs(ModelConfig(backbone="resnet50", weights=str(tmp_path / "w.h5"))),
             "--weights", "is not a file")):
        (need,) = needs
        assert isinstance(need, preflight.LocalProblem) and need.flag == flag
        assert need.message.startswith(flag) and words in need.message


def test_workdir_must_be_writable_or_creatable(tmp_path):
    (tmp_path / "file").write_text("")
    assert preflight.workdir_needs(str(tmp_path / "new" / "deeper")) == []
    (problem,) = preflight.workdir_needs(str(tmp_path / "file" / "run"))
    assert problem.message.startswith(f"--workdir={tmp_path / 'file' / 'run'} is not writable")
    assert preflight.workdir_needs("gs://bucket/run") == []


def test_hosts_are_looked_up_once_each(monkeypatch):
    looked_up = []
    monkeypatch.setattr(sources, "host_resolves", lambda url: looked_up.append(url) or True)
    preflight.require([preflight.Remote("--a", "a", "https://example.org/a", ""),
                       preflight.Remote("--b", "b", "https://example.org/b", ""),
                       preflight.Remote("--data_dir", "c", "gs://bucket/data", "")])
    assert sorted(looked_up) == ["https://example.org", f"https://{preflight.GCS_HOST}"]


def test_a_finished_run_is_complete_without_its_inputs_but_a_changed_one_is_checked(
        image_dir, tmp_path):
    import shutil

    from trainer import train

    config = tiny(backbone="wide_resnet", image_dir=image_dir, image_size=16, epochs=1,
                  global_batch_size=4, wrn_width=1, precision="float32", jit_compile="false",
                  workdir=str(tmp_path / "run"), export=False)
    summary = train.train_and_evaluate(config)
    shutil.rmtree(image_dir)
    assert train.train_and_evaluate(config) == summary  # nothing to do, nothing to read
    with pytest.raises(UserError, match="--image_dir"):  # more epochs need the images
        train.train_and_evaluate(config_lib.override(config, {"epochs": 2}))
