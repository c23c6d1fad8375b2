"""The synthetic phantom set."""

import hashlib

from hvdmri.data.listing import CLASS_NAMES, list_images
from hvdmri.data.synth import ensure_phantom_set, write_phantoms


def digest(folder):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*.jpg")))).hexdigest()


def test_phantoms_are_deterministic(tmp_path):
    a = write_phantoms(tmp_path / "a", per_class=3, image_size=48, seed=5)
    b = write_phantoms(tmp_path / "b", per_class=3, image_size=48, seed=5)
    c = write_phantoms(tmp_path / "c", per_class=3, image_size=48, seed=6)
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_phantom_set_has_the_kaggle_layout(tmp_path):
    root = ensure_phantom_set(tmp_path, per_class=2, test_per_class=1, image_size=48)
    assert list_images(root / "Training").counts() == {name: 2 for name in CLASS_NAMES}
    assert list_images(root / "Testing").counts() == {name: 1 for name in CLASS_NAMES}
    # A second call reuses the set instead of writing it again.
    stamp = (root / "Training" / "glioma").stat().st_mtime_ns
    assert ensure_phantom_set(tmp_path, per_class=2, test_per_class=1, image_size=48) == root
    assert (root / "Training" / "glioma").stat().st_mtime_ns == stamp
