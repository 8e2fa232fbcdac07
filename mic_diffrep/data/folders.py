"""Image folders as `datasets` splits: loose images, class sub-folders, or split folders holding class sub-folders.

`load_image_folder` reads an unlabelled folder of images or a labelled tree (`<split>/<class>/*.jpg`, with split
folders such as `Training`/`Testing` or `train`/`val`/`test`, any case) into the columns `datasets`' `imagefolder`
builder gives (`image`, undecoded, and a `label` `ClassLabel`), from a scan of the files: no Arrow cache is written
(`imagefolder` left one, and a lock file, in the `datasets` cache for every folder it read), split folders are
mapped explicitly (`imagefolder` alone merges `Training/` and `Testing/` into one split), and so are DICOM (`.dcm`,
`.dicom`, or no extension with a DICOM preamble) and NIfTI (`.nii`, `.nii.gz`) files, which `imagefolder` ignores,
and folders that are symbolic links, which it does not follow. The `label` is the class folder right under the
split folder (files may sit deeper in it, e.g. in one folder per patient or series, which `imagefolder` would take
as the classes; a warning says so), and a file stays one row, whatever number of slices it holds (`decode_images`
expands it into its slices). A data folder that holds a single folder and nothing else is read through it.

```python
>>> from mic_diffrep.data import load_image_folder, select_splits
>>> splits = load_image_folder("mic_diffrep/sample_data/brain-tumor-mri")  # doctest: +SKIP
>>> names, train = select_splits(splits)  # every split except test  # doctest: +SKIP

```
"""

import logging
import os
import unicodedata
from typing import Dict, List, Optional, Sequence

from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, concatenate_datasets
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

from ..models.mic_diffrep.preprocessing import has_dicom_preamble, undecoded_images
from ..utils import check_folder, warn_once
from .decoding import source_file
from .medical import MEDICAL_EXTENSIONS


logger = logging.getLogger(__name__)

# Canonical split name -> folder names that mean it (compared case-insensitively).
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval"),
}
# The image files `datasets`' `imagefolder` reads (what PIL opens: .jfif, .jp2, .tga, ... as well as JPEG and PNG)
IMAGE_EXTENSIONS = tuple(sorted(ImageFolder.EXTENSIONS))
# What folders are searched for: ordinary images and clinical files (DICOM, NIfTI).
SEARCHED_EXTENSIONS = IMAGE_EXTENSIONS + MEDICAL_EXTENSIONS
SEARCHED_WHAT = f"the image files PIL reads (.jpg, .png, .tif, ...), and {', '.join(MEDICAL_EXTENSIONS)} files"


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


# What `datasets` writes: `save_to_disk` folders (these files) and data files (these extensions).
DATASETS_FOLDER_FILES = ("dataset_dict.json", "state.json")
DATASETS_FILE_EXTENSIONS = (".arrow", ".parquet")
# `imagefolder`'s metadata files, whose columns (a label among them) `load_image_folder` does not read.
METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
HOW_TO_SAVE = ("load it with `datasets` (`load_from_disk`, `load_dataset(\"parquet\", ...)` or "
               "`load_dataset(\"imagefolder\", ...)`) and write it as class folders with "
               "`mic_diffrep.data.save_image_folder(dataset, FOLDER, label_column=...)`")


def datasets_format(path: str) -> Optional[str]:
    """What `datasets` wrote at `path`, if anything: a `save_to_disk` folder, a Parquet / Arrow file, or a folder of
    nothing but such files, which are not image folders; `None` for anything else (an image folder with a Parquet
    file or a `state.json` of another tool beside its class folders is one)."""
    if os.path.isfile(path):
        return "a Parquet / Arrow file" if path.lower().endswith(DATASETS_FILE_EXTENSIONS) else None
    if os.path.isdir(path):
        names = [name for name in os.listdir(path) if not name.startswith(".")]
        if set(names) & set(DATASETS_FOLDER_FILES) and not _has_images(path):
            return "a `datasets` save_to_disk folder"
        data_files = [name for name in names if name.lower().endswith(DATASETS_FILE_EXTENSIONS)]
        if data_files and all(name in data_files or name.lower().endswith((".json", ".md", ".txt", ".lock"))
                              for name in names):
            return "a folder of Parquet / Arrow files"
    return None


def is_image_file(name: str) -> bool:
    """Whether a file name or path has one of `SEARCHED_EXTENSIONS` (an ordinary image, DICOM or NIfTI; any case),
    or, given a path, is a DICOM file named without an extension (`IM0001`: its preamble is read)."""
    return name.lower().endswith(SEARCHED_EXTENSIONS) or has_dicom_preamble(name)


def _walk(folder: str):
    """`os.walk` that follows symbolic links to folders (splits and classes built from links; two class folders may
    link to one folder), without going round a loop (a link to a folder it is in). Pruning the yielded `dirs` in
    place prunes the walk, as in `os.walk`."""
    within = {folder: {os.path.realpath(folder)}}  # each folder walked: the real folders it is in
    for root, dirs, files in os.walk(folder, followlinks=True):
        chain = within.pop(root)
        kept = []
        for name in dirs:
            real = os.path.realpath(os.path.join(root, name))
            if real not in chain:
                kept.append(name)
                within[os.path.join(root, name)] = chain | {real}
        dirs[:] = kept
        yield root, dirs, files


def _has_images(folder: str) -> bool:
    for root, _, files in _walk(folder):
        if any(is_image_file(os.path.join(root, name)) for name in files):
            return True
    return False


def _holds_images(path: str) -> bool:
    """Whether `path` is an image file, or a folder with images in it."""
    return _has_images(path) if os.path.isdir(path) else is_image_file(path)


def find_image_files(folder: str) -> List[str]:
    """Sorted image files under `folder` (recursively; hidden files and folders, such as macOS `._*` files and
    `.ipynb_checkpoints`, left out, as `datasets` does). Other files are left out with a warning that counts them."""
    found, others, metadata = [], [], []
    for root, dirs, files in _walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        for name in files:
            if name.lower() in METADATA_FILES:
                metadata.append(os.path.join(root, name))
            elif not name.startswith("."):
                (found if is_image_file(os.path.join(root, name)) else others).append(os.path.join(root, name))
    if metadata:
        warn_once(logger, "%s is an imagefolder metadata file, whose columns are not read here (labels are class "
                  "sub-folders). To use a label column of it, %s.", sorted(metadata)[0], HOW_TO_SAVE)
    if others:
        warn_once(logger, "%d file(s) in %s are not images read here and are left out (e.g. %s): images are %s; a "
                  "DICOM file named without an extension needs its preamble (the 'DICM' prefix at byte 128).",
                  len(others), folder, sorted(others)[0], SEARCHED_WHAT)
    broken = next((path for path in found if "\n" in path or "\r" in path), None)
    if broken is not None:  # an image list (`test_images.txt`) holds one file per line
        raise ValueError(f"{broken!r}: a file or folder name with a line break cannot be listed one per line (the "
                         f"probe's test_images.txt); rename it.")
    return sorted(found)


def load_image_folder(data_dir: str):
    """Loads an image folder as a `datasets.DatasetDict` whose `image` column holds file paths (not decoded).

    Split folders (`Training/`, `Testing/`, `train/`, `val/`, `test/`, ...; any case) become the splits `train`,
    `validation` and `test`; a folder without them is one `train` split. Class sub-folders become a `label`
    `ClassLabel` column (names sorted, shared by all splits); a folder of loose images has no labels.

    DICOM and NIfTI files count as images, one row per file. In deeper trees (`glioma/patient1/slice.jpg`) a file's
    class is the folder right under the split folder (or `data_dir`), as a medical dataset sorted by class and then
    patient expects; `imagefolder` would label it `patient1`.
    """
    written_by_datasets = datasets_format(data_dir)
    if written_by_datasets:
        raise ValueError(f"Data folder {os.fspath(data_dir)!r} is {written_by_datasets}, not an image folder: "
                         f"{HOW_TO_SAVE}.")
    check_folder(data_dir, "Data folder", "the folder that holds the images")
    given, data_dir = data_dir, _unwrap(data_dir)
    split_folders = find_split_folders(data_dir)
    data_dir = os.path.abspath(data_dir)
    roots = ({split: os.path.join(data_dir, folder) for split, folder in split_folders.items()} if split_folders
             else {"train": data_dir})
    files = {split: find_image_files(root) for split, root in roots.items()}  # one walk, for the checks and the rows
    if not any(files.values()):
        raise ValueError(f"No images found in {given!r} (looked for {SEARCHED_WHAT}).")
    if split_folders:
        empty = [split_folders[split] for split in roots if not files[split]]
        if empty:
            raise ValueError(f"Split folder(s) {empty} in {data_dir!r} contain no images.")
        beside = [entry for entry in sorted(os.listdir(data_dir))
                  if not entry.startswith((".", "__")) and entry not in split_folders.values()
                  and _holds_images(os.path.join(data_dir, entry))]
        if beside:  # `class/` beside `test/`: the class folders were left out without a word
            raise ValueError(f"{data_dir!r} has split folders ({', '.join(split_folders.values())}) and images beside "
                             f"them ({', '.join(beside)}), which would be left out: move them into a split folder "
                             f"(e.g. train/) or out of the data folder.")
        _check_class_folders(data_dir, split_folders)
    return _checked_class_names(_scan_image_folder(roots, files))


def _checked_class_names(dataset: DatasetDict) -> DatasetDict:
    """`dataset` with its class names in Unicode NFC (macOS writes folder names decomposed, so a class folder copied
    from a Mac and the same class made elsewhere had two names that look alike), warning when numbered classes
    (`0`, `1`, `10`, `2`) are ordered as text, as `datasets` orders them: label 2 is then class `10`."""
    split = next(iter(dataset.values()))
    if "label" not in split.features:
        return dataset
    names = split.features["label"].names
    numeric = sorted(names, key=int) if all(name.isdigit() for name in names) else names
    first = next((i for i, (name, number) in enumerate(zip(names, numeric)) if name != number), None)
    if first is not None:
        width = max(map(len, names))
        logger.warning("Class folders %s are ordered as text, as `datasets` orders them: label %d is class %r, not %r. "
                       "Leading zeros (%s) make both orders agree.", ", ".join(names), first, names[first],
                       numeric[first], ", ".join(name.zfill(width) for name in numeric))
    normalised = [unicodedata.normalize("NFC", name) for name in names]
    if normalised == names:
        return dataset
    merged = sorted(set(normalised))  # one class for a name written both ways (two folders on Linux)
    index = [merged.index(name) for name in normalised]
    features = split.features.copy()
    features["label"] = ClassLabel(names=merged)
    return dataset.map(lambda batch: {"label": [index[label] for label in batch["label"]]}, batched=True,
                       features=features)


def _unwrap(data_dir: str) -> str:
    """`data_dir`, or the one folder it holds when it holds nothing else (`download/brain-mri/{glioma,...}`): its
    classes are then the folders inside that one, as `imagefolder` found them."""
    while not find_split_folders(data_dir):
        entries = [e for e in os.listdir(data_dir) if not e.startswith((".", "__"))]
        folders = [e for e in entries if os.path.isdir(os.path.join(data_dir, e))]
        if len(folders) != 1 or len(entries) != 1:
            break
        logger.info("%s holds only the folder %s: reading that.", data_dir, folders[0])
        data_dir = os.path.join(data_dir, folders[0])
    return data_dir


def _scan_image_folder(split_roots: Dict[str, str], files: Dict[str, List[str]]) -> DatasetDict:
    """What `imagefolder` gives, built from the image `files` of each split root (see the module docstring).

    A file's label is the class folder right under its split root. As with `imagefolder`, there is a `label`
    column only when every file sits in a class folder and there are at least two classes (names sorted, shared by
    all splits).
    """
    parts = {split: [os.path.relpath(path, split_roots[split]).split(os.sep) for path in paths]
             for split, paths in files.items()}
    classes = {split: [p[0] if len(p) > 1 else None for p in split_parts] for split, split_parts in parts.items()}
    names = sorted({name for split_classes in classes.values() for name in split_classes if name is not None})
    loose = any(name is None for split_classes in classes.values() for name in split_classes)
    add_labels = not loose and len(names) > 1
    deep = next((path for split, split_parts in parts.items() for path, p in zip(files[split], split_parts)
                 if len(p) > 2), None)
    if add_labels and deep is not None:
        warn_once(logger, "Images sit below their class folders (e.g. %s): each is labelled by the folder right under "
                  "its split folder (%s), as class/patient/... trees need; for a tree of other folders first "
                  "(site/class/...), give one of them as the data folder.", deep, ", ".join(names))
    if loose and names:
        warn_once(logger, "Images sit both loose and in sub-folders of %s; as with `imagefolder`, no labels are "
                  "inferred.", sorted(split_roots.values()))
    features = Features({"image": Image(decode=False)})
    if add_labels:
        features["label"] = ClassLabel(names=names)
    splits = {}
    for split, paths in files.items():
        columns = {"image": [{"path": path, "bytes": None} for path in paths]}
        if add_labels:
            columns["label"] = [names.index(name) for name in classes[split]]
        splits[split] = Dataset.from_dict(columns, features=features)
    return DatasetDict(splits)


def _check_class_folders(data_dir: str, split_folders: Dict[str, str]) -> None:
    """Warns when a class folder exists in one split but not in another (labels stay consistent regardless)."""
    classes = {
        split: {d for d in os.listdir(os.path.join(data_dir, folder))
                if os.path.isdir(os.path.join(data_dir, folder, d)) and not d.startswith((".", "__"))}  # not read
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


def label_by_class_folder(dataset, data_dir: str, class_names: Sequence[str]):
    """`dataset` (a split of `load_image_folder`) labelled with the one class it holds, when every file sits in a
    folder named after the same one of `class_names` (`data_dir` itself, or one folder inside it, as in
    `Testing/glioma/`): a folder of one class reads as unlabelled, since its class folder cannot be told from a
    wrapper folder without knowing the classes, or as labelled by the folders inside it when it holds one folder per
    patient (`Testing/glioma/patient1/`), whose names are none of `class_names`. Else `dataset` unchanged."""
    if not len(dataset):
        return dataset
    root, names = os.path.abspath(data_dir), set(class_names)
    if "label" in dataset.features:
        if set(dataset.features["label"].names) & names:  # class folders (of the classes, or some of them)
            return dataset
        labelled, dataset = dataset, dataset.remove_columns("label")  # folders of patients, not of classes
    else:
        labelled = dataset
    found = set()
    for item in undecoded_images(dataset)["image"]:
        folders = [os.path.basename(root)] + os.path.relpath(item["path"], root).split(os.sep)[:-1]
        folders = [unicodedata.normalize("NFC", folder) for folder in folders]  # as class names are (a Mac's NFD)
        found.add(tuple(folder for folder in folders if folder in names))
    if len(found) != 1 or len(next(iter(found))) != 1:
        return labelled
    name = next(iter(found))[0]
    logger.warning("%s holds one class folder: reading all its %d image file(s) as class %r.", data_dir,
                   len(dataset), name)
    return dataset.add_column("label", [0] * len(dataset), feature=ClassLabel(names=[name]))


def check_labelled(dataset, what: str, purpose: str = "linear probing",
                   needs: str = "class sub-folders of at least two classes") -> None:
    """Raises a `ValueError` naming `what` unless `dataset` (a split of `load_image_folder`, not yet decoded) has
    labels: a missing label fails before any image is decoded."""
    if "label" not in dataset.features:
        loose = _loose_beside_folders([item["path"] for item in undecoded_images(dataset)["image"]
                                       if item.get("path")])
        hint = (f" Image files sit loose beside the class folders, which leaves every image unlabelled (as "
                f"`imagefolder` reads it): move {', '.join(loose[:3])}{' and others' if len(loose) > 3 else ''} into "
                f"a class folder or out of the data folder." if loose else "")
        raise ValueError(f"{what} has no labels: {purpose} needs {needs} (e.g. Training/glioma/*.jpg and "
                         f"Training/notumor/*.jpg).{hint}")


def _loose_beside_folders(paths: Sequence[str]) -> List[str]:
    """The image files of `paths` that sit in a folder whose sub-folders hold images too (`data/overview.png` beside
    `data/glioma/*.jpg`)."""
    folders = {os.path.dirname(path) for path in paths}
    parents = {folder for folder in folders if any(other.startswith(folder + os.sep) for other in folders)}
    return sorted(path for path in paths if os.path.dirname(path) in parents)


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


# The test images a probe scored, written beside its results: `mic-diffrep evaluate --image_list` scores them again.
TEST_IMAGES_FILE = "test_images.txt"


def relative_image_id(image_id: str, root: str) -> str:
    """An image id (a file path, or `"<path>#slice=<k>"` for a slice of a DICOM / NIfTI file) relative to the folder
    `root`, with `/` separators, as image lists hold them.

    ```python
    >>> relative_image_id("/data/brain/glioma/scan.nii.gz#slice=12", "/data/brain")
    'glioma/scan.nii.gz#slice=12'

    ```
    """
    path = source_file(image_id)
    return os.path.relpath(path, root).replace(os.sep, "/") + image_id[len(path):]


def write_image_list(path: str, image_ids: Sequence[str], root: str, comment: str) -> None:
    """Writes image ids relative to `root`, one per line, after a `#` comment line."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(f"# {comment}\n")
        f.writelines(relative_image_id(image_id, root) + "\n" for image_id in image_ids)


def read_image_list(path: str, flag: str = "--image_list", root: Optional[str] = None) -> List[str]:
    """The image ids of an image list (`write_image_list`): one per line; blank lines and `#` comments skipped.
    With `root` (the folder the ids are relative to), ids written otherwise are taken as they are meant: an absolute
    path or one like `./glioma/x.jpg` becomes its id relative to `root` (one outside `root` stays outside it, and
    names no image of it).

    ```python
    >>> import os, tempfile
    >>> with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
    ...     _ = f.write("# test images\\n./glioma/a.jpg\\n/data/brain/notumor/b.jpg#slice=2\\n")
    >>> read_image_list(f.name, root="/data/brain")
    ['glioma/a.jpg', 'notumor/b.jpg#slice=2']
    >>> os.remove(f.name)

    ```
    """
    try:
        with open(path, encoding="utf-8") as f:
            ids = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{flag} {path} cannot be read: {error}") from None
    if not ids:
        raise ValueError(f"{flag} {path} lists no images.")
    if root is not None:
        ids = [_id_under(root, source_file(image_id)) + image_id[len(source_file(image_id)):] for image_id in ids]
    return ids


def _id_under(root: str, path: str) -> str:
    """A listed file's id relative to `root`: `path` as it is when relative; an absolute one relative to `root`,
    through symbolic links where need be (`/tmp` is `/private/tmp` on macOS: a list of resolved paths names the
    images of a folder given through a link, and the other way round)."""
    if not os.path.isabs(path):
        return relative_image_id(os.path.join(root, path), root)
    for base, file in ((os.path.abspath(root), os.path.abspath(path)),
                       (os.path.realpath(root), os.path.join(os.path.realpath(os.path.dirname(path)),
                                                             os.path.basename(path)))):
        relative = os.path.relpath(file, base)
        if relative != os.pardir and not relative.startswith(os.pardir + os.sep):
            return relative.replace(os.sep, "/")
    return relative_image_id(path, root)


def listed_files(dataset: Dataset, data_dir: str, image_list: str, flag: str = "--exclude_image_list") -> set:
    """The files (relative to `data_dir`) of the rows of `dataset` (images of `data_dir`) that an image list names
    (ids relative to `data_dir`, as `write_image_list` writes them: the `test_images.txt` a probe writes, say; a slice
    id names its whole file). Every listed file must be among the rows, so that a list of another folder fails
    instead of naming nothing, and some row must be left unlisted."""
    listed = {source_file(image_id) for image_id in read_image_list(image_list, flag, root=data_dir)}
    files = [relative_image_id(item["path"], data_dir) if item.get("path") else None
             for item in undecoded_images(dataset)["image"]]
    missing = sorted(listed - set(files))
    if missing:
        raise ValueError(f"{flag} {image_list}: {len(missing)} listed file(s) are not among the images read of "
                         f"{data_dir} (e.g. {missing[0]!r}; the list's paths are relative to that folder, and the "
                         f"images read are those of its splits chosen, --pretrain_splits).")
    if set(files) <= listed:
        raise ValueError(f"{flag} {image_list} lists every image read of {data_dir}: none is left.")
    return listed
