"""The command line: flags -> config, --print_config, one-paragraph errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from conftest import run_main


def test_print_config_resolves_preset_and_explicit_flags(capsys):
    code, out, _ = run_main(["--experiment=bit_transfer", "--epochs=3", "--batch_size=32",
                             "--print_config"], capsys)
    assert code == 0
    resolved = json.loads(out)
    assert resolved["model"]["backbone"] == "bit" and resolved["model"]["trainable"] is False
    assert resolved["train"]["learning_rate"] == 1e-4  # from the preset
    assert resolved["train"]["epochs"] == 3 and resolved["data"]["global_batch_size"] == 32


def test_flags_not_given_keep_the_preset(capsys):
    code, out, _ = run_main(["--experiment=smoke", "--print_config"], capsys)
    resolved = json.loads(out)
    assert (resolved["data"]["dataset"], resolved["data"]["image_size"], resolved["train"]["epochs"]) == (
        "synthetic", 32, 2)


@pytest.mark.parametrize("argv, flag", [
    (["--epochs=abc"], "--epochs"),
    (["--backbone=vgg16"], "--backbone"),
    (["--experiment=nope"], "--experiment"),
    (["--val_fraction=0"], "--val_fraction"),
    (["--image_dir=/nonexistent/flowers", "--backbone=wide_resnet"], "--image_dir"),
    (["--backbone=bit", "--hub_handle=/nonexistent/bit"], "--hub_handle"),
    (["--backbone=resnet50", "--weights=/nonexistent/w.h5"], "--weights"),
    (["--backbone=wide_resnet", "--notrainable"], "--notrainable"),
    (["stray_argument"], "unexpected"),
])
def test_bad_input_is_one_paragraph_naming_the_flag(argv, flag, capsys, tmp_path):
    # tf_flowers is never asked for: it would be downloaded before the model is built.
    code, _, err = run_main(argv + ["--dataset=synthetic", f"--workdir={tmp_path / 'run'}"], capsys)
    assert code == 2
    assert flag in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_unprepared_dataset_offline_names_data_dir_and_image_dir(capsys, tmp_path):
    code, _, err = run_main(["--backbone=wide_resnet", f"--data_dir={tmp_path}",
                             f"--workdir={tmp_path / 'run'}"], capsys)
    assert code == 2 and "--data_dir" in err and "--image_dir" in err


def test_unwritable_workdir_fails_before_training(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_main(["--experiment=smoke", f"--workdir={blocker / 'run'}"], capsys)
    assert code == 2 and "--workdir" in err and "not writable" in err


@pytest.mark.slow
def test_real_command_exits_2_without_traceback(tmp_path):
    for argv in (["--image_size=big"], ["--experiment=smoke", "--batch_size=5000",
                                        f"--workdir={tmp_path / 'run'}"]):
        done = subprocess.run([sys.executable, "-m", "trainer.main", *argv],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr[-1000:]
        assert "Traceback" not in done.stderr
        assert "error: " in done.stderr and ("--image_size" in done.stderr or "--batch_size" in done.stderr)


def test_every_config_field_is_a_flag_with_the_help_written_in_the_config():
    from trainer import config as config_lib
    from trainer import main

    for name, field in config_lib.leaf_fields().items():
        flag = main.FLAGS[config_lib.flag_name(name)]
        assert field.metadata["help"] in flag.help, name
        assert flag.default == field.default, name
    assert main.FLAGS["batch_size"].help.startswith("GLOBAL batch size")
