"""The run folder: the contract between training and everything that reads its results.

    RUN_DIR/
      config.json          resolved training configuration
      classes.json         class names in the model's output order
      history.csv          one row per epoch: phase, learning rate, train and validation metrics
      checkpoints/last.weights.h5, checkpoints/best.weights.h5, checkpoints/state.json
      model.keras          the final model (no optimizer), what evaluate and predict load
      metrics.json         validation metrics of the final model

Every file is written to a temporary name in the same folder and renamed into
place, so a crash or a full disk leaves the previous complete file readable.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

CONFIG_FILE = "config.json"
CLASSES_FILE = "classes.json"
HISTORY_FILE = "history.csv"
MODEL_FILE = "model.keras"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to path; on success, fsync it and rename it over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps every suffix: Keras picks the file format by them
    # (".weights.h5" and ".h5" are different formats).
    suffix = ".tmp" + "".join(path.suffixes)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        # mkstemp creates the file private (0600); give it the usual umask permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def json_safe(value: Any) -> Any:
    """Return value with NaN and infinities as None and NumPy scalars and arrays as Python types.

    json.dumps writes NaN as the bare token NaN, which strict JSON parsers reject.
    """
    import numpy as np

    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write data as strict JSON (NaN and infinities as null), atomically."""
    text = json.dumps(json_safe(data), indent=2, allow_nan=False)
    with atomic_path(path) as temporary:
        temporary.write_text(text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def read_class_names(run_dir: str | os.PathLike) -> tuple[str, ...]:
    """Return the class names a trained model's outputs stand for.

    Raises:
        FileNotFoundError: run_dir is not a finished hvdmri run folder.
        ValueError: classes.json is not {"class_names": [distinct names]}.
    """
    path = Path(run_dir) / CLASSES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not an hvdmri run folder ({CLASSES_FILE} not found)")
    try:
        names = read_json(path)["class_names"]
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{path} is malformed ({type(error).__name__}: {error}); it should read "
                         f'{{"class_names": ["glioma", "meningioma", ...]}}') from None
    if (not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names)):
        raise ValueError(f"{path} is malformed: class_names must be a list of distinct non-empty names, "
                         f"got {names!r}")
    return tuple(names)


def load_trained_model(run_dir: str | os.PathLike):
    """Load RUN_DIR/model.keras with its class names and image size.

    Returns:
        (model, class_names, image_size)

    Raises:
        FileNotFoundError: the folder has no model.keras or classes.json.
    """
    import tensorflow as tf

    run_dir = Path(run_dir)
    model_path = run_dir / MODEL_FILE
    if not model_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no trained model ({MODEL_FILE} not found); "
                                f"train first, or point --model at a finished run folder")
    class_names = read_class_names(run_dir)
    model = tf.keras.models.load_model(model_path, compile=False)
    image_size = int(model.input_shape[1])
    return model, class_names, image_size


def lock_run_dir(run_dir: Path):
    """Take an exclusive lock on run_dir; return the open lock file, which holds it until closed.

    Two trainings writing one folder would interleave checkpoints and history. The
    lock is an flock, so it ends with the process however the process ends.

    Raises:
        UsageError: another process holds the lock.
    """
    from hvdmri.distributed import UsageError

    handle = open(Path(run_dir) / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UsageError(f"--run-dir {run_dir} is in use by another training ({holder}); wait for it "
                         f"to end or choose another --run-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def remove_if_unused(run_dir: Path) -> bool:
    """Delete run_dir when it contains no checkpoint and no model; return whether it did.

    A training that fails before its first checkpoint leaves only a configuration
    behind, which would otherwise look like a run to resume.
    """
    run_dir = Path(run_dir)
    checkpoints = run_dir / CHECKPOINT_DIR
    if not run_dir.is_dir() or (run_dir / MODEL_FILE).exists():
        return False
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


class CheckpointWriteError(OSError):
    """Rank 0 could not write a checkpoint; the previous complete one is still in place."""

    def __init__(self, folder: Path, error: OSError):
        self.folder = Path(folder)
        self.error = error
        try:
            free_mb = shutil.disk_usage(self.folder).free / 2**20
        except OSError:
            free_mb = math.nan
        # Errors raised through h5py may carry no errno, so free space decides too.
        self.disk_full = error.errno in (errno.ENOSPC, errno.EDQUOT) or free_mb < 1
        cause = f"the disk is full ({free_mb:.0f} MB free)" if self.disk_full else f"{error}"
        super().__init__(f"cannot write to {self.folder}: {cause}; the previous checkpoint is intact, "
                         f"so free space there and rerun the same command to resume")


def epoch_checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}.weights.h5"


def link_or_copy(source: Path, destination: Path) -> None:
    """Make destination the same file as source, replacing it atomically.

    A hard link costs no space; file systems without hard links get a copy.
    """
    with atomic_path(destination) as temporary:
        temporary.unlink()
        try:
            os.link(source, temporary)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            shutil.copyfile(source, temporary)


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` epoch checkpoints, and a stop checkpoint an epoch has superseded.

    Called only after the newest epoch's checkpoint and state.json are complete.
    """
    from hvdmri.stopping import STOPPED_CHECKPOINT

    epoch_files = sorted(Path(folder).glob("epoch-[0-9][0-9][0-9][0-9].weights.h5"))
    for path in [*epoch_files[:max(len(epoch_files) - keep, 0)], Path(folder) / STOPPED_CHECKPOINT]:
        path.unlink(missing_ok=True)
