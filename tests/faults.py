"""Fault injection for tests: runs `python -m trainer.main` with a pause point and a worse epoch.

As a script (`python tests/faults.py TRAINER_FLAGS...`) it runs the trainer's
command line with these environment variables:

  FAULT_PAUSE_AT=EVENT   when EVENT happens, write FAULT_MARKER and wait (to be killed);
                         EVENT is one of
                           train_batch:E   after the first training batch of 1-based epoch E
                           history:E       right after history.csv has epoch E's row
                           backup:E        right after the backup of epoch E, before anything else
                           epoch_begin:E   when epoch E begins (epoch E-1 fully recorded)
                           publish:NAME    before the staged NAME directory (export,
                                           best, ...) is published by rename
  FAULT_MARKER=PATH      the file written at the pause point
  FAULT_RELEASE=PATH     the pause ends once PATH exists (a hold: the test signals the paused
                         run, then lets it go on); without it the pause lasts until killed
  FAULT_ASCEND_FROM=E    from 1-based epoch E on, the learning rate is negated and
                         multiplied by 10: gradient ascent makes those epochs worse, for sure

It wraps the trainer's public functions (create_callbacks, write_history_row,
files.publish_directory); the trainer itself has no test hooks. As a module, `start`
runs it in a subprocess and `wait_for` waits for an event.
"""

import os
import signal
import subprocess
import sys
import time

SCRIPT = os.path.abspath(__file__)


def environment(marker, pause_at=None, ascend_from=None, release=None):
    """os.environ with the fault variables of a run that pauses at `pause_at` (see above)."""
    if os.path.exists(marker):
        os.remove(marker)
    env = {**os.environ, "FAULT_MARKER": str(marker)}
    for name, value in (("FAULT_PAUSE_AT", pause_at), ("FAULT_ASCEND_FROM", ascend_from),
                        ("FAULT_RELEASE", release)):
        env.pop(name, None)
        if value:
            env[name] = str(value)
    return env


def start(workdir, flags, pause_at=None, ascend_from=None):
    """Starts the trainer in a subprocess on `workdir`; returns (process, marker path)."""
    marker = f"{workdir}.paused"
    env = environment(marker, pause_at, ascend_from)
    process = subprocess.Popen([sys.executable, SCRIPT, f"--workdir={workdir}", *flags], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return process, marker


def wait_for(process, condition, timeout=300):
    """Waits until condition() holds while `process` runs; fails if it exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if process.poll() is not None:
            output = process.stderr or process.stdout  # whichever the caller piped, if any
            raise AssertionError(f"exited early ({process.returncode}): "
                                 f"{output.read()[-3000:] if output else ''}")
        time.sleep(0.02)
    raise AssertionError("timed out")


def kill_when_paused(process, marker):
    """Waits for the pause point, SIGKILLs the process; returns its stderr."""
    wait_for(process, lambda: os.path.exists(marker))
    process.send_signal(signal.SIGKILL)
    _, err = process.communicate()
    return err


def _pause(marker):
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    release = os.environ.get("FAULT_RELEASE")
    while release is None:  # until killed
        signal.pause()
    while not os.path.exists(release):  # held; signal handlers run meanwhile
        time.sleep(0.01)


def _install(pause_at, marker, ascend_from):
    import tf_keras as keras

    from trainer import callbacks as callbacks_lib
    from trainer import files
    from trainer import workdir as workdir_lib

    event, _, arg = (pause_at or ":").partition(":")
    number = int(arg) if arg.isdigit() else None

    class WithinEpoch(keras.callbacks.Callback):
        """First in the list: sets the learning rate before an epoch; pauses in one."""

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch, self.batches = epoch + 1, 0
            rate = float(keras.backend.get_value(self.model.optimizer.learning_rate))
            if ascend_from and self.epoch >= ascend_from and rate > 0:  # once: a resume restores it
                keras.backend.set_value(self.model.optimizer.learning_rate, -10 * rate)
            if event == "epoch_begin" and self.epoch == number:
                _pause(marker)

        def on_train_batch_end(self, batch, logs=None):
            self.batches += 1
            if event == "train_batch" and self.epoch == number and self.batches == 1:
                _pause(marker)

    class AfterBackup(keras.callbacks.Callback):
        """Right after the BackupAndRestore callback in the list."""

        def on_epoch_end(self, epoch, logs=None):
            if event == "backup" and epoch + 1 == number:
                _pause(marker)

    create_callbacks = callbacks_lib.create_callbacks

    def create_callbacks_with_faults(*args, **kwargs):
        callbacks = [WithinEpoch(), *create_callbacks(*args, **kwargs)]
        backup = next(i for i, c in enumerate(callbacks)
                      if isinstance(c, keras.callbacks.BackupAndRestore))
        callbacks.insert(backup + 1, AfterBackup())
        return callbacks

    write_history_row = workdir_lib.write_history_row

    def write_history_row_with_faults(path, epoch, values):
        write_history_row(path, epoch, values)
        if event == "history" and epoch == number:
            _pause(marker)

    publish_directory = files.publish_directory

    def publish_directory_with_faults(staging, target, *args, **kwargs):
        if event == "publish" and os.path.basename(target) == arg:
            _pause(marker)
        return publish_directory(staging, target, *args, **kwargs)

    callbacks_lib.create_callbacks = create_callbacks_with_faults
    workdir_lib.write_history_row = write_history_row_with_faults
    files.publish_directory = publish_directory_with_faults


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(SCRIPT)))  # as `python -m` from the root
    import trainer  # noqa: F401  picks the Keras 2 API before TensorFlow loads
    from trainer import main

    _install(os.environ.get("FAULT_PAUSE_AT"), os.environ.get("FAULT_MARKER"),
             int(os.environ.get("FAULT_ASCEND_FROM", "0")))
    sys.argv = ["trainer", *sys.argv[1:]]
    main.run()
