"""Image folders in, decoded uint8 tensors out.

`load_image_folder` reads an unlabelled folder of images or a labelled tree (`<split>/<class>/*.jpg`, with split
folders such as `Training`/`Testing` or `train`/`val`/`test`) through `datasets`' `imagefolder` builder.
`decode_images` decodes every file once (in parallel with `num_workers`), applies the shared preprocessing of
`mic_diffrep.preprocessing` and keeps the uint8 result in memory, optionally cached on disk as safetensors, so
training epochs never decode a JPEG again.

Example:

```python
>>> from mic_diffrep.data import load_image_folder, decode_images
>>> splits = load_image_folder("mic_diffrep/sample_data/brain-tumor-mri")  # doctest: +SKIP
>>> decoded = decode_images(splits["train"], 64)  # doctest: +SKIP
>>> decoded.pixels.shape, decoded.label_names  # doctest: +SKIP
(torch.Size([160, 1, 64, 64]), ['glioma', 'meningioma', 'notumor', 'pituitary'])
```
"""

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from .preprocessing import ImagePreprocessing, pixels_to_model_input
from .unet_features import noise_seed_for


logger = logging.getLogger(__name__)

# Canonical split name -> folder names that mean it (compared case-insensitively).
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm")

_DECODE_CACHE_VERSION = "2"


class BadImageError(ValueError):
    """An image file that cannot be decoded. The message names the file."""


def find_split_folders(data_dir: str) -> Dict[str, str]:
    """Maps canonical split names (`train`, `validation`, `test`) to the sub-folders of `data_dir` that hold them."""
    found = {}
    for entry in sorted(os.listdir(data_dir)):
        if not os.path.isdir(os.path.join(data_dir, entry)):
            continue
        for split, aliases in SPLIT_ALIASES.items():
            if entry.lower() in aliases:
                if split in found:
                    raise ValueError(
                        f"{data_dir} has two folders for the {split!r} split: {found[split]!r} and {entry!r}."
                    )
                found[split] = entry
    return found


def _has_images(folder: str) -> bool:
    for _, _, files in os.walk(folder):
        if any(name.lower().endswith(IMAGE_EXTENSIONS) for name in files):
            return True
    return False


def load_image_folder(data_dir: str):
    """Loads an image folder as a `datasets.DatasetDict` whose `image` column holds file paths (not decoded).

    Split folders (`Training/`, `Testing/`, `train/`, `val/`, `test/`, ...; any case) become the splits `train`,
    `validation` and `test`; a folder without them is one `train` split. Class sub-folders become a `label`
    `ClassLabel` column (names sorted, shared by all splits); a folder of loose images has no labels.
    """
    from datasets import Image, load_dataset

    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"Data folder {data_dir!r} does not exist.")
    if not _has_images(data_dir):
        raise ValueError(f"No images found in {data_dir!r} (looked for {', '.join(IMAGE_EXTENSIONS)}).")
    split_folders = find_split_folders(data_dir)
    if split_folders:
        data_dir = os.path.abspath(data_dir)
        empty = [folder for folder in split_folders.values() if not _has_images(os.path.join(data_dir, folder))]
        if empty:
            raise ValueError(f"Split folder(s) {empty} in {data_dir!r} contain no images.")
        _check_class_folders(data_dir, split_folders)
        data_files = {split: os.path.join(data_dir, folder, "**") for split, folder in split_folders.items()}
        dataset = load_dataset("imagefolder", data_files=data_files)
    else:
        dataset = load_dataset("imagefolder", data_dir=data_dir)
    return dataset.cast_column("image", Image(decode=False))


def _check_class_folders(data_dir: str, split_folders: Dict[str, str]) -> None:
    """Warns when a class folder exists in one split but not in another (labels stay consistent regardless)."""
    classes = {
        split: {d for d in os.listdir(os.path.join(data_dir, folder)) if os.path.isdir(os.path.join(data_dir, folder, d))}
        for split, folder in split_folders.items()
    }
    union = set().union(*classes.values())
    for split, names in classes.items():
        missing = union - names
        if names and missing:
            logger.warning(
                "Class folder(s) %s are missing from the %r split (%s); labels use the union of all splits.",
                sorted(missing), split, split_folders[split],
            )


def select_splits(dataset_dict, splits: Optional[Sequence[str]] = None, purpose: str = "--pretrain_splits"):
    """Concatenates the chosen splits. `None` means every split except `test`; `["all"]` means every split."""
    from datasets import concatenate_datasets

    available = list(dataset_dict.keys())
    if splits is None:
        chosen = [s for s in available if s != "test"]
    elif list(splits) == ["all"]:
        chosen = available
    else:
        unknown = [s for s in splits if s not in available]
        if unknown:
            raise ValueError(f"{purpose}: unknown split(s) {unknown}; this dataset has {available} (or use 'all').")
        chosen = list(splits)
    if not chosen:
        raise ValueError(f"{purpose}: no split left to use; this dataset has {available}.")
    return chosen, concatenate_datasets([dataset_dict[s] for s in chosen])


@dataclass
class DecodedImages:
    """Decoded, preprocessed images: uint8 `pixels` of shape `(N, 1, R, R)` with their file paths and labels."""

    pixels: torch.Tensor
    paths: List[str]
    labels: Optional[torch.Tensor] = None
    label_names: Optional[List[str]] = None
    skipped: List[Dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int]) -> "DecodedImages":
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return DecodedImages(
            pixels=self.pixels[index],
            paths=[self.paths[i] for i in index.tolist()],
            labels=None if self.labels is None else self.labels[index],
            label_names=self.label_names,
            skipped=list(self.skipped),
        )


class _DecodeFiles(torch.utils.data.Dataset):
    def __init__(self, sources: List[Union[str, bytes]], preprocessing: ImagePreprocessing):
        self.sources, self.preprocessing = sources, preprocessing

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, index):
        source = self.sources[index]
        try:
            with PIL.Image.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
                image.load()
                return index, self.preprocessing(image), None
        except Exception as error:  # noqa: BLE001 - every decoding failure is reported with its file
            return index, None, f"{type(error).__name__}: {error}"


def _collate(items):
    return items


def _sources_of(images) -> (List[Union[str, bytes]], List[str], Optional[List[int]], Optional[List[str]]):
    """File sources, display paths, labels and label names of a `datasets.Dataset` or a list of paths."""
    if isinstance(images, (list, tuple)):
        return list(images), [str(p) for p in images], None, None
    column = images["image"]
    sources = [item["path"] if item.get("path") else item["bytes"] for item in column]
    paths = [item.get("path") or f"<bytes #{i}>" for i, item in enumerate(column)]
    labels = label_names = None
    if "label" in images.column_names:
        labels = list(images["label"])
        label_names = list(images.features["label"].names)
    return sources, paths, labels, label_names


def _cache_key(paths: List[str], preprocessing: ImagePreprocessing) -> str:
    digest = hashlib.sha256(f"{_DECODE_CACHE_VERSION}|{preprocessing}".encode())
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}|missing\n".encode())
    return digest.hexdigest()[:24]


def decode_images(
    images,
    preprocessing: Union[ImagePreprocessing, int],
    skip_bad_images: bool = False,
    num_workers: int = 0,
    cache_dir: Optional[str] = None,
    show_progress: bool = True,
) -> DecodedImages:
    """Decodes and preprocesses every image once.

    Args:
        images: a `datasets.Dataset` from `load_image_folder` (or any split of it), or a list of file paths.
        preprocessing (`ImagePreprocessing` or `int`): the preprocessing settings (resolution, resize mode,
            intensity window); an int is a resolution with the default settings.
        skip_bad_images (`bool`, defaults to `False`):
            by default an unreadable file raises `BadImageError` naming it; with `True` it is skipped and listed in
            `DecodedImages.skipped`.
        num_workers (`int`): decoding processes (a `torch.utils.data.DataLoader` does the work).
        cache_dir (`str`, *optional*):
            where to keep the decoded tensors as safetensors, keyed by the files (path, size, mtime) and settings.
    """
    preprocessing = ImagePreprocessing.of(preprocessing)
    sources, paths, labels, label_names = _sources_of(images)
    if not sources:
        raise ValueError("No images to decode.")
    cache_file = None
    if cache_dir is not None:
        cache_file = os.path.join(cache_dir, f"decoded-{_cache_key(paths, preprocessing)}.safetensors")
        if os.path.isfile(cache_file):
            decoded = _load_decoded(cache_file)
            if decoded.skipped and not skip_bad_images:
                bad = decoded.skipped[0]
                raise BadImageError(_bad_image_message(bad["path"], bad["error"]))
            logger.info("Loaded %d decoded images from %s", len(decoded), cache_file)
            return decoded

    resolution = preprocessing.resolution
    pixels = torch.empty((len(sources), 1, resolution, resolution), dtype=torch.uint8)
    ok = torch.ones(len(sources), dtype=torch.bool)
    skipped = []
    loader = torch.utils.data.DataLoader(
        _DecodeFiles(sources, preprocessing), batch_size=32, num_workers=num_workers, collate_fn=_collate
    )
    with tqdm(total=len(sources), desc="Decoding images", unit="img", disable=not show_progress) as progress:
        for batch in loader:
            for index, tensor, error in batch:
                if error is not None:
                    if not skip_bad_images:
                        raise BadImageError(_bad_image_message(paths[index], error))
                    logger.warning("Skipping unreadable image %s (%s)", paths[index], error)
                    skipped.append({"path": paths[index], "error": error})
                    ok[index] = False
                else:
                    pixels[index] = tensor
            progress.update(len(batch))
    keep = ok.nonzero().flatten().tolist()
    if not keep:
        raise ValueError(f"None of the {len(sources)} images could be decoded (first error: {skipped[0]['error']}).")
    decoded = DecodedImages(
        pixels=pixels[ok],
        paths=[paths[i] for i in keep],
        labels=None if labels is None else torch.tensor([labels[i] for i in keep], dtype=torch.long),
        label_names=label_names,
        skipped=skipped,
    )
    if cache_file is not None:
        _save_decoded(decoded, cache_file)
    return decoded


def _bad_image_message(path: str, error: str) -> str:
    return (
        f"Cannot read image {path}: {error}. Fix or remove the file, or pass --skip_bad_images to skip unreadable "
        f"images (skipped files are listed in the run's log and results)."
    )


def _save_decoded(decoded: DecodedImages, cache_file: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(cache_file) or ".", exist_ok=True)
    tensors = {"pixels": decoded.pixels.contiguous()}
    if decoded.labels is not None:
        tensors["labels"] = decoded.labels
    metadata = {
        "paths": json.dumps(decoded.paths),
        "label_names": json.dumps(decoded.label_names),
        "skipped": json.dumps(decoded.skipped),
    }
    tmp = f"{cache_file}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, cache_file)


def _load_decoded(cache_file: str) -> DecodedImages:
    from safetensors import safe_open

    with safe_open(cache_file, framework="pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
        pixels = f.get_tensor("pixels")
        labels = f.get_tensor("labels") if "labels" in keys else None
    return DecodedImages(
        pixels=pixels,
        paths=json.loads(metadata["paths"]),
        labels=labels,
        label_names=json.loads(metadata["label_names"]),
        skipped=json.loads(metadata["skipped"]),
    )


class PretrainingDataset(torch.utils.data.Dataset):
    """Decoded images in a seeded per-epoch order with seeded horizontal flips.

    Order and flips depend only on `(seed, epoch)`, so a run resumed in the middle of an epoch sees exactly the
    batches an uninterrupted run would. Call `shuffle_for_epoch` before iterating (not named `set_epoch`: accelerate's loaders call that with their own
    iteration count, which restarts at 0 after a resume); use a sequential sampler (the
    shuffling is done here) so that `accelerate` can shard whole batches across processes.
    """

    def __init__(self, pixels: torch.Tensor, seed: int = 0, random_flip: bool = True):
        self.pixels = pixels
        self.seed = seed
        self.random_flip = random_flip
        self.shuffle_for_epoch(0)

    def shuffle_for_epoch(self, epoch: int) -> None:
        generator = torch.Generator().manual_seed(seed_for(self.seed, epoch))
        self.order = torch.randperm(len(self.pixels), generator=generator)
        self.flips = torch.rand(len(self.pixels), generator=generator) < 0.5

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        image = pixels_to_model_input(self.pixels[self.order[index]])
        if self.random_flip and self.flips[index]:
            image = image.flip(-1)
        return {"pixel_values": image, "index": self.order[index]}


def seed_for(*keys: int) -> int:
    """A 63-bit seed derived from integers (e.g. `(seed, epoch, batch, rank)`), well mixed by `numpy.SeedSequence`."""
    return noise_seed_for(*keys)
