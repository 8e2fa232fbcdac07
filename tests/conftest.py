import os

import numpy as np
import PIL.Image
import pytest


CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


def synthetic_slice(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A grey 'slice': a bright ellipse (the head) with a class-dependent blob, plus noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    head = ((xx - 0.5) ** 2 / 0.16 + (yy - 0.5) ** 2 / 0.2) < 1
    # Each slice gets its own smooth texture (like anatomy), so slices are not near-duplicates of each other.
    coarse = rng.random((4, 4))
    texture = np.kron(coarse, np.ones((size // 4 + 1, size // 4 + 1)))[:size, :size]
    image = (0.25 + 0.35 * texture) * head
    cy, cx = [(0.35, 0.35), (0.35, 0.65), (0.65, 0.5), (0.5, 0.5)][label % 4]
    cy, cx = cy + rng.normal(0, 0.03), cx + rng.normal(0, 0.03)
    radius = 0.06 + 0.04 * (label % 4 == 3)
    image += (label % 4 != 2) * 0.45 * (((xx - cx) ** 2 + (yy - cy) ** 2) < radius**2)
    image += rng.normal(0, 0.05, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def write_class_folder(root, per_class: int, seed: int, size: int = 32, classes=CLASSES):
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            PIL.Image.fromarray(synthetic_slice(label, rng, size)).save(os.path.join(root, name, f"{name}_{seed}_{i}.png"))
    return str(root)


@pytest.fixture
def unlabelled_folder(tmp_path):
    """24 loose grey images, no classes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "unlabelled"
    root.mkdir()
    for i in range(24):
        PIL.Image.fromarray(synthetic_slice(i % 4, rng)).save(root / f"{i:03d}.png")
    return str(root)


@pytest.fixture
def kaggle_folder(tmp_path):
    """A Kaggle-style tree: Training/<class>/*.png (6 per class) and Testing/<class>/*.png (2 per class)."""
    root = tmp_path / "kaggle"
    write_class_folder(root / "Training", per_class=6, seed=1)
    write_class_folder(root / "Testing", per_class=2, seed=2)
    return str(root)


def parse(settings_class, argv):
    """Flags -> settings dataclass, as the command line does it (`HfArgumentParser`)."""
    from transformers import HfArgumentParser

    return HfArgumentParser(settings_class).parse_args_into_dataclasses(list(argv))[0]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test starts with no accelerate state, so tests may use different mixed precisions in one process."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
