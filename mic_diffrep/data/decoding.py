"""Decoded images: every file decoded once, preprocessed, and kept as uint8 tensors (optionally cached on disk).

`decode_images` decodes every file once (in parallel with `num_workers`), applies the model's preprocessing
(`ImagePreprocessing`: grey, intensity window, resize) and keeps the uint8 result in memory, optionally cached as
safetensors, so training epochs never decode a JPEG again.

DICOM and NIfTI files (`mic_diffrep.data.medical`) are expanded into their slices, chosen by a `SliceSelection`
(axis, range, empty slices): each slice is one image, with the id `"<path>#slice=<k>"` when the file holds several
slices (`k` is the slice or frame index within the file), the plain path otherwise; its label is the file's. A
slice with a display window of its own (DICOM *WindowCenter* / *WindowWidth*, NIfTI *cal_min* / *cal_max*) is
windowed with it, any other image by the preprocessing's intensity rule.

```python
>>> from mic_diffrep.data import decode_images, load_image_folder
>>> splits = load_image_folder("mic_diffrep/sample_data/brain-tumor-mri")  # doctest: +SKIP
>>> decoded = decode_images(splits["train"], 64)  # doctest: +SKIP
>>> decoded.pixels.shape, decoded.label_names  # doctest: +SKIP
(torch.Size([120, 1, 64, 64]), ['glioma', 'meningioma', 'notumor', 'pituitary'])

```
"""

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..models.mic_diffrep.preprocessing import (ImagePreprocessing, image_pages, medical_bytes_as_file,
                                                medical_record_suffix, record_source, slice_id, undecoded_images)
from ..utils import progress_interval, save_safetensors
from .medical import SliceSelection, is_medical_file


logger = logging.getLogger(__name__)

_DECODE_CACHE_VERSION = "3"  # 3: files keyed by their contents (2: by size and modification time)


class BadImageError(ValueError):
    """An image file that cannot be decoded. The message names the file."""


@dataclass
class DecodedImages:
    """Decoded, preprocessed images: uint8 `pixels` of shape `(N, 1, R, R)` with their ids and labels.

    `paths` holds one id per image: the file path, or `"<path>#slice=<k>"` for slice `k` of a multi-slice DICOM /
    NIfTI file. `skipped` lists the unreadable files (`{"path", "error"}`). `fingerprint`: the images'
    `images_fingerprint` (files and settings) when `decode_images` kept them in a cache (`cache_dir`; the files are
    read once more to hash them), `None` otherwise and for a subset or a copy.
    """

    pixels: torch.Tensor
    paths: List[str]
    labels: Optional[torch.Tensor] = None
    label_names: Optional[List[str]] = None
    skipped: List[Dict[str, str]] = field(default_factory=list)
    fingerprint: Optional[str] = None

    def __len__(self) -> int:
        return len(self.paths)

    def mirrored(self) -> "DecodedImages":
        """The same images mirrored left-right (same ids and labels)."""
        return replace(self, pixels=self.pixels.flip(-1), fingerprint=None)

    def subset(self, indices: Sequence[int]) -> "DecodedImages":
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return DecodedImages(
            pixels=self.pixels[index],
            paths=[self.paths[i] for i in index.tolist()],
            labels=None if self.labels is None else self.labels[index],
            label_names=self.label_names,
            skipped=list(self.skipped),
        )


def merge_skipped(*parts: DecodedImages) -> List[Dict[str, str]]:
    """The unreadable files of several decoded sets, each once: subsets of one decode (a carved train and test split)
    share its list."""
    merged = {}
    for part in parts:
        for item in part.skipped:
            merged.setdefault(item["path"], item)
    return list(merged.values())


def source_file(image_id: str) -> str:
    """The file an image id comes from: `path` for `"<path>#slice=<k>"`, the id itself otherwise."""
    path, marker, index = image_id.rpartition("#slice=")
    return path if marker and index.isdigit() else image_id


class _DecodeFiles(torch.utils.data.Dataset):
    """Decodes file `index` into `(index, pixels (S, 1, R, R), slice indices (S entries, `None` for a 2-D image),
    error, whether it is a colour image)`: one slice for an ordinary image, every selected slice of a DICOM / NIfTI
    file, every page of a multi-page TIFF."""

    def __init__(self, sources: List[Union[str, bytes]], preprocessing: ImagePreprocessing, slices: SliceSelection,
                 names: Optional[List[str]] = None):
        self.sources, self.preprocessing, self.slices = sources, preprocessing, slices
        self.names = names  # the file names of bytes sources (a DICOM / NIfTI file's bytes are read as that file)

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, index):
        source = self.sources[index]
        name = self.names[index] if self.names else None
        try:
            suffix = medical_record_suffix(source, name) if isinstance(source, bytes) else None
            if suffix or isinstance(source, str) and is_medical_file(source):
                if suffix:
                    with medical_bytes_as_file(source, name, suffix) as path:
                        items = self.slices.read(path)
                else:
                    items = self.slices.read(source)
                if not items:
                    raise ValueError("the file holds no image slices")
                pixels = torch.stack([self.preprocessing(item) for item in items])
                return index, pixels, [item.slice_index for item in items], None, False
            with PIL.Image.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
                pages = image_pages(image) if isinstance(source, str) else None
                if pages:  # a multi-page TIFF: one image per page, as a multi-frame DICOM
                    return (index, torch.stack([self.preprocessing(page) for page in pages]),
                            list(range(len(pages))), None, False)
                image.load()
                return index, self.preprocessing(image).unsqueeze(0), [None], None, is_colour(image)
        except Exception as error:  # noqa: BLE001 - every decoding failure is reported with its file
            return index, None, None, f"{type(error).__name__}: {error}", False


# How far apart an image's colour channels must be for it to be a colour image: the mean absolute difference of R and
# G, and of G and B, in grey levels of 0..255. Grey slices saved as RGB JPEGs differ by JPEG's chroma noise only (at
# most 2 in the brain MRI dataset).
COLOUR_TOLERANCE = 5.0


def is_colour(image: PIL.Image.Image) -> bool:
    """Whether a PIL image shows colour: a grey image saved in RGB (many MRI JPEGs are) is not one.

    >>> is_colour(PIL.Image.new("RGB", (8, 8), (90, 90, 91))), is_colour(PIL.Image.new("RGB", (8, 8), (200, 40, 40)))
    (False, True)
    """
    if image.mode in ("1", "L", "LA", "I", "F") or image.mode.startswith("I;"):
        return False
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    return bool(np.abs(np.diff(rgb, axis=-1)).mean() > COLOUR_TOLERANCE)


def _collate(items):
    return items


def _sources_of(images) -> (List[Union[str, bytes]], List[str], Optional[List[int]], Optional[List[str]]):
    """File sources, display paths, labels and label names of a `datasets.Dataset`, a list of paths or one path."""
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if isinstance(images, (list, tuple)):
        other = next((p for p in images if not isinstance(p, (str, os.PathLike))), None)
        if other is not None:
            raise TypeError(f"decode_images takes file paths or a datasets.Dataset, got a {type(other).__name__} in "
                            f"the list; images in memory: `mic_diffrep.data.preprocess_images`.")
        sources = [os.fspath(p) for p in images]
        return sources, sources, None, None
    if not hasattr(images, "column_names") or not hasattr(images, "cast_column"):
        raise TypeError(f"decode_images takes file paths or a datasets.Dataset, got {type(images).__name__}.")
    images = undecoded_images(images)
    column = [{"path": item, "bytes": None} if isinstance(item, str) else item for item in images["image"]]  # paths
    if not all(isinstance(item, dict) for item in column):
        raise TypeError(f"The `image` column holds {type(next(i for i in column if not isinstance(i, dict))).__name__}"
                        f" values: decode_images reads images stored as files (a datasets Image column, or paths); "
                        f"images in memory: `mic_diffrep.data.preprocess_images`.")
    sources = [record_source(item) for item in column]
    paths = [item.get("path") or f"<bytes #{i}>" for i, item in enumerate(column)]
    labels = label_names = None
    if "label" in images.column_names:
        labels = list(images["label"])
        other = next((label for label in labels if not isinstance(label, int) or isinstance(label, bool)), None)
        if other is not None:
            raise ValueError(f"The `label` column holds {type(other).__name__} values ({other!r}): decode_images "
                             f"takes class indices, a ClassLabel or integers (`dataset.class_encode_column('label')`).")
        names = getattr(images.features["label"], "names", None)  # a ClassLabel; plain integers name themselves
        label_names = list(names) if names is not None else [str(i) for i in range(max(labels, default=-1) + 1)]
    return sources, paths, labels, label_names


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def images_fingerprint(images, preprocessing: Union[ImagePreprocessing, int],
                       slices: Optional[SliceSelection] = None) -> str:
    """What the decoded images of `images` (as `decode_images` takes them) depend on, hashed: the settings and
    each file (its path and contents). It keys the decode cache, and a pretraining's summary records it."""
    sources, paths, _, _ = _sources_of(images)
    return _cache_key(sources, paths, ImagePreprocessing.of(preprocessing),
                      SliceSelection() if slices is None else slices)


def _cache_key(sources: List[Union[str, bytes]], paths: List[str], preprocessing: ImagePreprocessing,
               slices: SliceSelection, show_progress: bool = False) -> str:
    """The decoded images' cache key: the settings and each file (path and contents; a file replaced by another of
    the same size and modification time, as `cp -p` or `rsync -a` leave it, is read anew), or the bytes read
    instead. Reading every file takes a while for a big dataset: `show_progress` shows it."""
    key = f"{_DECODE_CACHE_VERSION}|{preprocessing}"
    if any(is_medical_file(path) for path in paths):  # the slice selection only changes DICOM / NIfTI files
        key += f"|{slices}"
    if any(path.lower().endswith((".tif", ".tiff")) for path in paths):  # caches that read a TIFF's first page only
        key += "|tiff-pages"
    digest = hashlib.sha256(key.encode())
    for source, path in tqdm(zip(sources, paths), total=len(paths), desc="Checking the decode cache", unit="img",
                             disable=not show_progress, mininterval=progress_interval(), delay=2):
        if isinstance(source, bytes):  # a record's bytes, whatever its file name says
            # (a DICOM / NIfTI file's bytes keyed apart: caches of versions that could not read them listed them bad)
            kind = "medical-bytes" if medical_record_suffix(source, path) else "bytes"
            digest.update(f"{path}|{kind}|{hashlib.sha256(source).hexdigest()}\n".encode())
            continue
        try:
            digest.update(f"{os.path.abspath(path)}|{_file_digest(path)}\n".encode())
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
    slices: Optional[SliceSelection] = None,
) -> DecodedImages:
    """Decodes and preprocesses every image once; DICOM and NIfTI files give one image per slice.

    Args:
        images: a `datasets.Dataset` from `load_image_folder` (or any split of it), or a list of file paths.
        preprocessing (`ImagePreprocessing` or `int`): the preprocessing settings (resolution, resize mode,
            intensity window); an int is a resolution with the default settings.
        skip_bad_images (`bool`, defaults to `False`):
            by default an unreadable file (or a DICOM / NIfTI file with no slice left) raises `BadImageError`
            naming it; with `True` it is skipped and listed in `DecodedImages.skipped`.
        num_workers (`int`): decoding processes (a `torch.utils.data.DataLoader` does the work).
        cache_dir (`str`, *optional*):
            where to keep the decoded tensors as safetensors, keyed by the files (path and contents) and settings.
            The cache file is written only once every file is decoded.
        slices (`SliceSelection`, *optional*): which slices of NIfTI volumes become images (slicing axis, range,
            empty slices); defaults to `SliceSelection()`: every non-empty axial slice.

    Returns:
        [`DecodedImages`]: one row per image (per slice for DICOM / NIfTI files: ids `"<path>#slice=<k>"` for
        multi-slice files, labels repeated), in file order, then slice order.
    """
    preprocessing = ImagePreprocessing.of(preprocessing)
    slices = SliceSelection() if slices is None else slices
    if not isinstance(slices, SliceSelection):
        raise TypeError(f"`slices` must be a SliceSelection, got {type(slices).__name__}.")
    sources, paths, labels, label_names = _sources_of(images)
    if not sources:
        raise ValueError("No images to decode.")
    key = cache_file = None
    if cache_dir is not None:  # hashing every file is the cache's cost, not every decode's
        key = _cache_key(sources, paths, preprocessing, slices, show_progress)
        cache_file = os.path.join(cache_dir, f"decoded-{key}.safetensors")
        decoded = _load_decoded(cache_file) if os.path.isfile(cache_file) else None
        if decoded is not None:
            decoded.fingerprint = key
            if decoded.skipped and not skip_bad_images:
                raise BadImageError(_bad_images_message(decoded.skipped))
            for item in decoded.skipped:  # said again, as decoding said it
                _say_skipped(item["path"], item["error"])
            logger.info("Loaded %d decoded images from %s", len(decoded), cache_file)
            return decoded

    chunks: List[torch.Tensor] = []
    ids: List[str] = []
    kept_labels: List[int] = []
    skipped = []
    coloured: List[str] = []
    # Its own generator: a DataLoader draws its workers' base seed from torch's global one, so decoding (skipped when
    # the cache holds the images) would change the initial weights a seeded run builds after it.
    loader = torch.utils.data.DataLoader(
        _DecodeFiles(sources, preprocessing, slices, names=paths), batch_size=32, num_workers=num_workers,
        collate_fn=_collate, generator=torch.Generator().manual_seed(0),
    )
    with tqdm(total=len(sources), desc="Decoding images", unit="img", disable=not show_progress,
              mininterval=progress_interval()) as progress:
        for batch in loader:
            for index, tensor, slice_indices, error, colour in batch:
                if colour:
                    coloured.append(paths[index])
                if error is not None:  # every unreadable file is found (and named) in one pass
                    if skip_bad_images:
                        _say_skipped(paths[index], error)
                    skipped.append({"path": paths[index], "error": error})
                    continue
                # A copy out of the worker's shared memory, so that no file descriptor stays open per file.
                chunks.append(tensor.clone() if num_workers else tensor)
                ids.extend(slice_id(paths[index], k) for k in slice_indices)
                if labels is not None:
                    kept_labels.extend([labels[index]] * len(slice_indices))
            progress.update(len(batch))
    if coloured:
        logger.warning(
            "%d of %d images are in colour (their channels differ; e.g. %s): they are read as one grey channel "
            "(luma), so what only their colour shows is lost to the model.", len(coloured), len(sources), coloured[0])
    if not chunks:
        if not skip_bad_images:
            raise BadImageError(_bad_images_message(skipped))
        raise ValueError(f"None of the {len(sources)} images could be decoded (first error: {skipped[0]['error']}).")
    decoded = DecodedImages(
        pixels=torch.cat(chunks),
        paths=ids,
        labels=None if labels is None else torch.tensor(kept_labels, dtype=torch.long),
        label_names=label_names,
        skipped=skipped,
        fingerprint=key,
    )
    if cache_file is not None:  # with the unreadable files too: `--skip_bad_images` then decodes nothing again
        _save_decoded(decoded, cache_file)
    if skipped and not skip_bad_images:
        raise BadImageError(_bad_images_message(skipped))
    return decoded


def _say_skipped(path: str, error: str) -> None:
    logger.warning("Skipping unreadable image %s (%s)", path, error)


def _bad_image_message(path: str, error: str) -> str:
    # The error often names the file itself (`MedicalImageError: path: ...`) and ends with a full stop already.
    kind, _, detail = error.partition(": ")
    if detail.startswith(f"{path}: "):
        error = f"{kind}: {detail[len(path) + 2:]}"
    return (
        f"Cannot read image {path}: {error.rstrip('.')}. Fix or remove the file, or pass --skip_bad_images to skip "
        f"unreadable images (each skipped file is named in the log and in what the command writes)."
    )


def _bad_images_message(bad: List[Dict[str, str]], shown: int = 5) -> str:
    """One line naming every unreadable file (the first `shown` with their errors), so that one round of fixes does."""
    if len(bad) == 1:
        return _bad_image_message(bad[0]["path"], bad[0]["error"])
    listed = "; ".join(f"{item['path']} ({item['error'].rstrip('.')})" for item in bad[:shown])
    more = f"; and {len(bad) - shown} more" if len(bad) > shown else ""
    return (f"Cannot read {len(bad)} images: {listed}{more}. Fix or remove the files, or pass --skip_bad_images to "
            f"skip unreadable images (each skipped file is named in the log and in what the command writes).")


def _save_decoded(decoded: DecodedImages, cache_file: str) -> None:
    os.makedirs(os.path.dirname(cache_file) or ".", exist_ok=True)
    tensors = {"pixels": decoded.pixels.contiguous()}
    if decoded.labels is not None:
        tensors["labels"] = decoded.labels
    metadata = {
        "paths": json.dumps(decoded.paths),
        "label_names": json.dumps(decoded.label_names),
        "skipped": json.dumps(decoded.skipped),
    }
    save_safetensors(tensors, cache_file, metadata=metadata)


def _load_decoded(cache_file: str) -> Optional[DecodedImages]:
    """The decoded images of a cache file, or `None` (with a warning) when it cannot be read: they are decoded again
    and the file rewritten."""
    try:
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
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:  # truncated, overwritten
        logger.warning("Decoded-image cache %s cannot be read (%s: %s): decoding the images again.", cache_file,
                       type(error).__name__, error)
        return None
