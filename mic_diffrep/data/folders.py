"""Image folders as `datasets` splits: loose images, class sub-folders, or split folders holding class sub-folders.

`load_image_folder` reads an unlabelled folder of images or a labelled tree (`<split>/<class>/*.jpg`, with split
folders such as `Training`/`Testing` or `train`/`val`/`test`, any case) through `datasets`' `imagefolder` builder,
mapping the split folders explicitly (`imagefolder` alone merges `Training/` and `Testing/` into one split).

```python
>>> from mic_diffrep.data import load_image_folder, select_splits
>>> splits = load_image_folder("mic_diffrep/sample_data/brain-tumor-mri")  # doctest: +SKIP
>>> names, train = select_splits(splits)  # every split except test  # doctest: +SKIP
```
"""

import logging
import os
from typing import Dict, Optional, Sequence

from datasets import Image, concatenate_datasets, load_dataset


logger = logging.getLogger(__name__)

# Canonical split name -> folder names that mean it (compared case-insensitively).
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm")


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


def select_splits(dataset_dict, splits: Optional[Sequence[str]] = None, purpose: str = "pretrain_splits"):
    """Concatenates the chosen splits. `None` means every split except `test`; `["all"]` means every split."""
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
