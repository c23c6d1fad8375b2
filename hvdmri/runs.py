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

import json
import math
import os
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
    """
    path = Path(run_dir) / CLASSES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not an hvdmri run folder ({CLASSES_FILE} not found)")
    return tuple(read_json(path)["class_names"])


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
