"""Shared fixtures: small image folders, real-data location, horovodrun helpers."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "brain-tumor-mri"
HOROVODRUN = Path(sys.executable).with_name("horovodrun")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def write_image(path: Path, image: np.ndarray) -> Path:
    """Write an image with OpenCV (BGR order for colour arrays)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(path.suffix if path.suffix.lower() != ".jpeg" else ".jpg", image)
    assert ok, f"could not encode {path}"
    path.write_bytes(encoded.tobytes())
    return path


@pytest.fixture
def phantom_dir(tmp_path) -> Path:
    """A tiny training folder: 8 phantoms per class at 64 px."""
    from hvdmri.data.synth import write_phantoms

    return write_phantoms(tmp_path / "Training", per_class=8, image_size=64, seed=3)


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "Training").is_dir():
        pytest.skip(f"real MRI images not found at {REAL_DATA} (only present in the development checkout)")
    return REAL_DATA


def clean_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}, **extra)
    # Tests run from any folder; the package must import from this checkout.
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_module(args: list[str], timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m ...` as a subprocess and capture its output."""
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env=clean_env(), cwd=cwd)


def horovodrun(np_: int, command: list[str], timeout: float = 900, cwd: Path | None = None,
               extra: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run command on np_ local workers through horovodrun's Gloo controller."""
    if not HOROVODRUN.exists() and not shutil.which("horovodrun"):
        pytest.skip("horovodrun not installed (run launch/setup.sh)")
    return subprocess.run(horovodrun_argv(np_, command, extra), capture_output=True, text=True, timeout=timeout,
                          env=clean_env(), cwd=cwd)


def horovodrun_argv(np_: int, command: list[str], extra: list[str] | None = None) -> list[str]:
    """Return the horovodrun command line that runs `python command` on np_ local Gloo workers."""
    launcher = str(HOROVODRUN) if HOROVODRUN.exists() else shutil.which("horovodrun")
    return [launcher, "--gloo", "-np", str(np_), "-H", f"localhost:{np_}", "--start-timeout", "60",
            *(extra or []), sys.executable, *command]


def descendants(parent: int) -> set[int]:
    """Return the pids of every process below parent."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The parent pid is the 2nd field after the parenthesised command name.
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = set(), [parent]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def rank_lines(output: str, rank: int) -> list[str]:
    """Lines horovodrun prefixed with this rank ("[1]<stdout>:..." under Gloo)."""
    prefix = f"[{rank}]<"
    return [line for line in output.splitlines() if line.startswith(prefix)]


@contextmanager
def models_loaded_once(patch: pytest.MonkeyPatch):
    """Make runs.load_trained_model load each model file once: a ResNet-50 .keras file takes seconds."""
    from hvdmri import runs

    cache = {}
    load = runs.load_trained_model

    def load_cached(run_dir):
        # Keyed by the model file's content, so a copied model.keras is loaded once
        # too; classes.json is read fresh from each run folder.
        model_path = Path(run_dir) / runs.MODEL_FILE
        if not model_path.is_file():
            return load(run_dir)
        key = hashlib.sha256(model_path.read_bytes()).hexdigest()
        if key not in cache:
            cache[key] = load(run_dir)
            return cache[key]
        model, _, image_size = cache[key]
        return model, runs.read_class_names(run_dir), image_size

    patch.setattr(runs, "load_trained_model", load_cached)
    yield


CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def make_untrained_run(folder: Path, image_size: int, seed: int) -> Path:
    """A run folder as training leaves it, with an untrained model: enough for evaluate and predict."""
    import tensorflow as tf

    from hvdmri import runs
    from hvdmri.model import build_model

    tf.keras.utils.set_random_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    build_model(len(CLASSES), image_size, weights=None).save(folder / runs.MODEL_FILE)
    runs.write_json(folder / runs.CLASSES_FILE, {"class_names": CLASSES})
    return folder


def noise_image(seed: int, height: int = 64, width: int = 64) -> np.ndarray:
    """A random RGB image: distinct per seed, and decodable once written."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
