"""Synthetic MRI-like phantoms in the Kaggle folder layout, for machines with no data.

Each image is an axial-looking head slice: a bright skull ring, brain tissue
with smooth texture, dark ventricles and a faint midline. The classes differ the
way the real tumors tend to look:
- glioma: an irregular, heterogeneous mass with a halo of edema inside one hemisphere;
- meningioma: a round, evenly bright mass pressed against the inner skull;
- pituitary: a small bright mass on the midline at the skull base (the sella);
- notumor: no mass.

Generation is deterministic: the same size, count and seed give the same bytes.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from hvdmri.data.listing import CLASS_NAMES

# Bump when the drawing changes, so stale cached sets are not reused.
PHANTOM_VERSION = 2
# Test phantoms are drawn from seed + this offset, so they never repeat a training
# phantom of the same seed. `python -m hvdmri.data synth` uses it too.
TEST_SEED_OFFSET = 1_000_003


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hvdmri"


def phantom_image(class_name: str, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one grayscale uint8 phantom of the given class."""
    s = image_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)

    # Head geometry, jittered per image.
    cx = s / 2 + rng.uniform(-0.04, 0.04) * s
    cy = s / 2 + rng.uniform(-0.04, 0.04) * s
    ax = rng.uniform(0.36, 0.42) * s  # horizontal semi-axis
    ay = rng.uniform(0.43, 0.47) * s  # vertical semi-axis
    angle = math.radians(rng.uniform(-8, 8))
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    u = ((xx - cx) * cos_a + (yy - cy) * sin_a) / ax
    v = (-(xx - cx) * sin_a + (yy - cy) * cos_a) / ay
    radius = np.sqrt(u**2 + v**2)  # 1.0 on the outer skull edge

    skull_inner = 1.0 - rng.uniform(0.06, 0.09)
    brain_edge = skull_inner - 0.03
    image = np.zeros((s, s), np.float32)
    image[radius <= 1.0] = rng.uniform(170, 215)  # skull
    image[radius <= skull_inner] = 25  # CSF layer
    brain = radius <= brain_edge
    image[brain] = rng.uniform(95, 125)

    # Smooth tissue texture: blurred noise, multiplied in so contrast scales with tissue.
    texture = cv2.GaussianBlur(rng.normal(0, 1, (s, s)).astype(np.float32), (0, 0), s / 40)
    texture /= texture.std() + 1e-6
    image[brain] *= 1.0 + 0.12 * texture[brain]

    # Ventricles and the midline.
    for side in (-1, 1):
        vu, vv = side * 0.12, -0.05 + rng.uniform(-0.03, 0.03)
        ventricle = ((u - vu) / 0.07) ** 2 + ((v - vv) / 0.2) ** 2 <= 1.0
        image[ventricle] = 35
    image[(np.abs(u) < 0.012) & brain] *= 0.7

    def place(center_u: float, center_v: float, extent: float) -> np.ndarray:
        """Return a mass's normalised radius map around (center_u, center_v) in head units."""
        return np.sqrt(((u - center_u) / extent) ** 2 + ((v - center_v) / (extent * ax / ay)) ** 2)

    if class_name == "glioma":
        side = rng.choice([-1.0, 1.0])
        mu, mv = side * rng.uniform(0.3, 0.5), rng.uniform(-0.4, 0.3)
        extent = rng.uniform(0.22, 0.32)
        # An irregular outline: the radius wobbles with a few low harmonics.
        theta = np.arctan2(v - mv, u - mu)
        wobble = 1.0 + sum(rng.uniform(0.08, 0.2) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
                           for k in (2, 3, 5))
        distance = place(mu, mv, extent) / wobble
        edema = (distance <= 1.5) & brain
        image[edema] *= 1.25
        mass = (distance <= 1.0) & brain
        image[mass] = 150 + 50 * rng.random(int(mass.sum()))
        core = (distance <= 0.45) & brain
        image[core] = 60
    elif class_name == "meningioma":
        theta = rng.uniform(0, 2 * np.pi)
        extent = rng.uniform(0.18, 0.26)
        reach = brain_edge - extent * 0.8
        mu, mv = reach * math.cos(theta), reach * math.sin(theta)
        mass = (place(mu, mv, extent) <= 1.0) & (radius <= skull_inner)
        image[mass] = rng.uniform(205, 235)
    elif class_name == "pituitary":
        extent = rng.uniform(0.10, 0.14)
        mu, mv = rng.uniform(-0.03, 0.03), rng.uniform(0.42, 0.52)
        mass = place(mu, mv, extent) <= 1.0
        image[mass] = rng.uniform(200, 235)
    elif class_name != "notumor":
        raise ValueError(f"unknown phantom class: {class_name}")

    image = cv2.GaussianBlur(image, (0, 0), max(0.5, s / 256))
    image += rng.normal(0, 4, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_phantoms(out_dir: str | os.PathLike, per_class: int, image_size: int = 128,
                   seed: int = 0, class_names: tuple[str, ...] = CLASS_NAMES,
                   prefix: str = "ph") -> Path:
    """Write per_class grayscale JPEG phantoms for each class into out_dir/<class>/."""
    out_dir = Path(out_dir)
    for label, name in enumerate(class_names):
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, label, i])
            image = phantom_image(name, image_size, rng)
            path = folder / f"{prefix}-{name[:2]}_{i:04d}.jpg"
            if not cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 92]):
                raise OSError(f"could not write {path}")
    return out_dir


def ensure_phantom_set(cache_dir: str | os.PathLike | None = None, per_class: int = 200,
                       test_per_class: int = 30, image_size: int = 128, seed: int = 0) -> Path:
    """Return a folder with Training/ and Testing/ phantom sets, generating it once.

    The set is written to a temporary folder and renamed into place, so processes
    that start together (several ranks on one node) never see a half-written set.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    name = f"phantoms-v{PHANTOM_VERSION}-{image_size}px-{per_class}+{test_per_class}-seed{seed}"
    target = cache_dir / name
    if (target / "Training").is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    try:
        write_phantoms(staging / "Training", per_class, image_size, seed, prefix="Tr")
        write_phantoms(staging / "Testing", test_per_class, image_size, seed + TEST_SEED_OFFSET, prefix="Te")
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "Training").is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
