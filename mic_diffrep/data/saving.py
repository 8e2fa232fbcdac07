"""`datasets` data as the image folder every mic-diffrep command reads (`load_image_folder`): a `save_to_disk` folder,
Parquet / Arrow files or an `imagefolder` labelled by a `metadata.csv` column, loaded with `datasets`, then written
as split and class folders by `save_image_folder`.

```python
>>> from datasets import load_from_disk
>>> from mic_diffrep.data import save_image_folder
>>> dataset = load_from_disk("brain_mri_dataset")  # a DatasetDict: train, validation, test  # doctest: +SKIP
>>> save_image_folder(dataset, "data/brain-mri", label_column="diagnosis")  # doctest: +SKIP
'data/brain-mri'

```
"""

import io
import itertools
import os
import re
import shutil
import unicodedata
from typing import Optional, Union

import numpy as np
import PIL.Image
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Image
from tqdm.auto import tqdm

from ..models.mic_diffrep.preprocessing import medical_record_suffix
from ..utils import progress_interval
from .folders import SEARCHED_WHAT, SPLIT_ALIASES, is_image_file


def save_image_folder(dataset: Union[Dataset, DatasetDict], output_dir: str, image_column: str = "image",
                      label_column: Optional[str] = "label") -> str:
    """Writes a `datasets.Dataset` or `DatasetDict` as the image folder `load_image_folder` and every command read;
    returns `output_dir`.

    A `DatasetDict`'s splits become split folders (`train/`, `validation/`, `test/`, or names meaning them such as
    `val`); a `Dataset` is the `train/` split. Each label becomes a class folder, named by the label column's
    `ClassLabel` names, its strings, or its integers; a dataset without `label_column` (pass `None`) is written
    unlabelled. Each image is written as it is stored: a record's bytes (DICOM and NIfTI files too) or a copy of
    its file, under its file name (numbered when it has none, or when another image of its class folder has it);
    an image held in memory (a PIL image, an array) as a PNG, 16-bit images kept 16-bit. `output_dir` must be new
    or empty: nothing is overwritten, and a row that cannot be written (named in the error) leaves it as it was.
    """
    if not isinstance(dataset, (Dataset, DatasetDict)):
        raise TypeError(f"save_image_folder takes a datasets.Dataset or DatasetDict, got {type(dataset).__name__}.")
    # A Dataset is the train split (`train/`): written without a split folder, one class folder would read back as
    # the data folder itself, and classes named like splits as splits
    splits = dataset if isinstance(dataset, DatasetDict) else {"train": dataset}
    folders = {}
    for split in splits:
        canonical = next((name for name, aliases in SPLIT_ALIASES.items() if split.lower() in aliases), None)
        if canonical is None:
            raise ValueError(f"Split {split!r} is none of the splits the image folder has (train, validation, "
                             f"test, or a name meaning one: {sorted(sum(SPLIT_ALIASES.values(), ()))}): select or "
                             f"rename it first (`DatasetDict({{'train': dataset[{split!r}]}})`).")
        if canonical in folders.values():
            raise ValueError(f"Splits {sorted(s for s in folders if folders[s] == canonical) + [split]} both mean "
                             f"{canonical!r}: keep one of them.")
        folders[split] = canonical
    class_folders = {}  # per split, each row's class folder ("" unlabelled), checked before anything is written
    for split, part in splits.items():
        name = f"dataset[{split!r}]" if isinstance(dataset, DatasetDict) else "dataset"
        if image_column not in part.column_names:
            raise ValueError(f"{name} has no image column {image_column!r}: its columns are {part.column_names}; "
                             f"pass image_column=.")
        if label_column is not None and label_column not in part.column_names:
            raise ValueError(f"{name} has no label column {label_column!r}: its columns are {part.column_names}; "
                             f"pass label_column= (None: unlabelled images).")
        class_folders[split] = [""] * len(part)
        if label_column is not None:
            classes = {}
            for index, label in enumerate(part[label_column]):
                folder = class_folders[split][index] = _class_folder(label, part.features[label_column], index)
                other = classes.setdefault(unicodedata.normalize("NFC", folder).casefold(), folder)
                if other != folder:  # one folder on macOS and Windows: their labels would be mixed
                    raise ValueError(f"Row {index}'s class {folder!r} and the class {other!r} differ only in case or "
                                     f"Unicode form, which macOS and Windows folders do not tell apart: rename one.")
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise FileExistsError(f"{output_dir!r} exists and is not an empty folder: give a new folder (nothing is "
                              f"overwritten).")
    total = sum(len(part) for part in splits.values())
    existed = os.path.isdir(output_dir)
    try:
        with tqdm(total=total, desc="Writing images", unit="img", mininterval=progress_interval()) as progress:
            for split, part in splits.items():
                if isinstance(part.features[image_column], Image):
                    part = part.cast_column(image_column, Image(decode=False))  # the stored bytes, not re-encoded
                taken = set()
                for index, row in enumerate(part):
                    folder = os.path.join(output_dir, folders[split], class_folders[split][index])
                    os.makedirs(folder, exist_ok=True)
                    _write_image(row[image_column], folder, index, taken)
                    progress.update(1)
    except BaseException:  # a row that cannot be written: no half-written folder left, which a rerun would refuse
        shutil.rmtree(output_dir, ignore_errors=True)
        if existed:
            os.makedirs(output_dir, exist_ok=True)
        raise
    return output_dir


def _class_folder(label, feature, index: int) -> str:
    """The class folder name of row `index`'s label, or an error naming the row when the folder would not be read
    back as that class (`load_image_folder` skips hidden and `__` folders) or cannot be made on every system."""
    if label is None or (isinstance(feature, ClassLabel) and label == -1):
        raise ValueError(f"Row {index} has no label: leave unlabelled rows out, or pass label_column=None.")
    name = feature.int2str(int(label)) if isinstance(feature, ClassLabel) else str(label)
    why = ("is empty" if not name.strip() else
           "would be a hidden folder, which is not read" if name.startswith((".", "__")) else
           "holds a path separator or a control character" if re.search(r"[/\\\x00-\x1f\x7f]", name) else
           "holds a character Windows folder names cannot (<>:\"|?*)" if re.search(r'[<>:"|?*]', name) else
           "ends in a dot or space, which Windows drops" if name.endswith((".", " ")) else
           "is a name Windows reserves" if name.split(".")[0].upper() in _WINDOWS_RESERVED else
           "is too long for a folder name" if len(name.encode()) > 255 else None)
    if why:
        raise ValueError(f"Row {index}'s class {name!r} {why}: rename the class.")
    return name


_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def _write_image(image, folder: str, index: int, taken: set) -> None:
    """Writes one image into `folder`: a `datasets` record's bytes or a copy of its file, or an in-memory image as a
    PNG. `taken`: the file names written so far into the class folders of its split."""
    if isinstance(image, str):  # a column of file paths
        image = {"path": image, "bytes": None}
    if isinstance(image, dict) and (image.get("bytes") is not None or image.get("path")):
        # its own file name, read back as an image: not hidden (a leading dot), no control characters
        name = re.sub(r"[\x00-\x1f\x7f]", "_", os.path.basename(image.get("path") or "")).lstrip(".")
        data = image.get("bytes")
        if data is None and not is_image_file(image["path"]):  # only images are copied
            raise ValueError(f"Row {index}'s image {image['path']!r} is not an image file read here ({SEARCHED_WHAT}).")
        if data is not None and not is_image_file(name):  # no extension an image is read by: the format's own
            suffix = medical_record_suffix(data, name) or _image_suffix(data, index)
            name = f"{name or f'{index:06d}'}{suffix}"
        path = _free_name(folder, name, index, taken)
        if data is not None:
            with open(path, "wb") as f:
                f.write(data)
        else:
            shutil.copyfile(image["path"], path)
        return
    if isinstance(image, torch.Tensor):
        image = image.numpy()
    if isinstance(image, (np.ndarray, list)):
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        image = PIL.Image.fromarray(array.astype(np.uint16) if array.dtype in (np.uint16, np.int32, np.int64)
                                    else array)
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"Row {index}'s image is a {type(image).__name__}: expected a datasets image, a PIL image or "
                        f"an array.")
    # PNG holds 8- and 16-bit grey and colour; floating-point pixels go to TIFF
    image.save(_free_name(folder, f"{index:06d}.{'tif' if image.mode == 'F' else 'png'}", index, taken))


def _image_suffix(data: bytes, index: int) -> str:
    """The extension of an encoded image, by its format."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as opened:
            image_format = opened.format
    except Exception as error:  # noqa: BLE001 - named with its row
        raise ValueError(f"Row {index}'s image bytes are not an image PIL reads: {error}") from None
    return {"JPEG": ".jpg", "TIFF": ".tif"}.get(image_format, f".{image_format.lower()}")


def _free_name(folder: str, name: str, index: int, taken: set) -> str:
    """`folder/name`, or, when another image of the folder has that name, the name with its row number added (and a
    count, should that be taken too): no image written replaces another (`taken` holds every path written into the
    split's folders, new or empty before)."""
    lowered = name.lower()
    stem_length = len(name) - (7 if lowered.endswith(".nii.gz") else len(os.path.splitext(name)[1]))
    stem, extension = name[:stem_length][:200], name[stem_length:]  # room for the suffix in 255 bytes
    candidates = itertools.chain([f"{stem}{extension}", f"{stem}-{index:06d}{extension}"],
                                 (f"{stem}-{index:06d}-{count}{extension}" for count in itertools.count(2)))
    path = next(p for p in (os.path.join(folder, c) for c in candidates) if p not in taken)
    taken.add(path)
    return path
