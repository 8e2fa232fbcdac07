"""The probe's images: training and test splits, the validation part carved from training, and leakage between them.

Every carved split (a test hold-out when the data has none, and always the validation part) keeps near-duplicate
groups (`mic_diffrep.leakage`) on one side, so selection and scores are not flattered by duplicates; the slices of
one DICOM / NIfTI file, and the images of one patient (a patient folder, `<class>/<patient>/...`; the DICOM files of
one *PatientID* or series; the files of one BIDS subject, `sub-01_...`), stay on one side too.
"""

import contextlib
import json
import logging
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch

from ..data import (DecodedImages, ImagePreprocessing, check_labelled, decode_images, label_by_class_folder,
                    load_image_folder, read_image_list, select_splits)
from ..data.decoding import source_file
from ..data.medical import patient_keys
from ..models.mic_diffrep.preprocessing import undecoded_images
from ..leakage import DEFAULT_THRESHOLD, check_leakage, duplicate_groups, fingerprint_images, group_stratified_split
from ..utils import SUMMARY_FILE, is_first_local_process, warn_once
from .arguments import ProbeArguments


logger = logging.getLogger(__name__)


@dataclass
class ProbeSplits:
    """Decoded training and test images of a probe, with where the test split came from."""

    train: DecodedImages
    test: DecodedImages
    test_source: str
    validation_mask: Optional[torch.Tensor] = None  # (N_train,) bool: the validation part of `train`
    leaked: Optional[torch.Tensor] = None  # (N_test,) bool: test images with a near-duplicate in `train`
    leakage: Optional[dict] = None  # the leakage report's counts
    validation_source: Optional[str] = None  # where the validation part came from
    class_warnings: List[str] = field(default_factory=list)  # classes the scores say little about


def _align_labels(test: DecodedImages, train_names: List[str], what: str) -> DecodedImages:
    """Maps the test labels onto the training label names (by name)."""
    if test.label_names == train_names:
        return test
    unknown = sorted(set(test.label_names) - set(train_names))
    if unknown:
        raise ValueError(f"{what} has classes {unknown} that the training images do not have ({train_names}).")
    mapping = torch.tensor([train_names.index(name) for name in test.label_names])
    test.labels, test.label_names = mapping[test.labels], list(train_names)
    return test


def patient_folder(image_id: str, class_name: Optional[str]) -> str:
    """What a carved split keeps on one side with an image: the folder right under its class folder when the image
    sits deeper (`.../glioma/patient1/series2/IM0001.dcm` -> `.../glioma/patient1`: a patient's slices, one file
    each as DICOM stores them), else its file (`source_file`: the slices of one volume).

    >>> patient_folder("/data/glioma/patient1/series2/IM0001.dcm", "glioma")
    '/data/glioma/patient1'
    >>> patient_folder("/data/glioma/vol.nii.gz#slice=3", "glioma")
    '/data/glioma/vol.nii.gz'
    >>> patient_folder("/mnt/glioma/Training/glioma/slice.jpg", "glioma")  # the class name higher up too
    '/mnt/glioma/Training/glioma/slice.jpg'
    """
    path = source_file(image_id)
    folder = os.path.dirname(path)

    def named(folder):  # class names are NFC (`load_image_folder`); a Mac's folder names are decomposed
        return unicodedata.normalize("NFC", os.path.basename(folder)) == class_name

    if class_name is None or named(folder):  # right in its class folder
        return path
    while os.path.dirname(folder) != folder:
        if named(os.path.dirname(folder)):
            return folder
        folder = os.path.dirname(folder)
    return path


def _patients(paths: Sequence[str], class_names: Sequence[Optional[str]]) -> List[List[str]]:
    """What keeps each image on one side with others: its patient folder (`patient_folder`: its file, or the folder
    under its class folder), and its file's DICOM patient and series or BIDS subject (`patient_keys`; read once per
    file), within its class folder."""
    keys_of_file = {}
    for path in paths:
        file = source_file(path)
        if file not in keys_of_file:
            keys_of_file[file] = patient_keys(file) if os.path.isfile(file) else []
    # Within its class folder: subjects numbered per class (glioma/sub-01_..., notumor/sub-01_...) are other patients.
    # A key held by more than half of a class's images (of 4 or more) is no patient's: an anonymised PatientID
    # ("ANONYMOUS" in every file).
    rows = [[(key, name) for key in keys_of_file[source_file(path)]] for path, name in zip(paths, class_names)]
    class_sizes = Counter(class_names)
    held = Counter(key for row in rows for key in row)
    anonymised = {key for key, count in held.items() if class_sizes[key[1]] >= 4 and count > class_sizes[key[1]] / 2}
    if anonymised:
        warn_once(logger, "%d patient key(s) (%s) are each held by more than half of a class's images: taken as "
                  "anonymised, they do not join images in a split.", len(anonymised),
                  ", ".join(sorted({key.split(":", 1)[0] for key, _ in anonymised})))  # no patient ids
    return [[f"folder:{patient_folder(path, name)}"] + [f"{key}@{name}" for key, name in row if (key, name)
                                                        not in anonymised]
            for path, name, row in zip(paths, class_names, rows)]


def _split_groups(decoded: DecodedImages, threshold: float) -> np.ndarray:
    """Near-duplicate groups, merged so that the slices of one DICOM / NIfTI file (ids `<path>#slice=<k>`), the
    images of one patient folder (`<class>/<patient>/...`), and the files of one DICOM patient or series (their
    *PatientID*, *SeriesInstanceUID*) or BIDS subject (`sub-01_...`) share a group: a carved split never puts
    neighbouring slices of one volume, or two slices of one patient, on both sides."""
    groups = duplicate_groups(fingerprint_images(decoded.pixels), threshold)
    labels = decoded.labels.tolist() if decoded.labels is not None else [None] * len(decoded)
    names = [None if label is None else decoded.label_names[label] for label in labels]
    return _merge_groups(groups, _patients(decoded.paths, names))


def _merge_groups(groups: np.ndarray, patients: Sequence[Sequence[str]]) -> np.ndarray:
    parent = list(range(len(groups)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = {}
    for index, (group, keys) in enumerate(zip(np.asarray(groups).tolist(), patients)):
        for key in [("group", group)] + [("patient", key) for key in keys]:
            if key in first:
                a, b = find(first[key]), find(index)
                parent[max(a, b)] = min(a, b)
            else:
                first[key] = index
    roots = [find(i) for i in range(len(parent))]
    _, merged = np.unique(roots, return_inverse=True)
    return merged.astype(np.int64)


def _carve(labels, groups: np.ndarray, fraction: float, seed: int, flag: str):
    """`group_stratified_split`, whose failure says what a user can change."""
    try:
        return group_stratified_split(labels, groups, fraction, seed=seed)
    except ValueError as error:
        if not str(error).startswith("Cannot split"):
            raise
        size = "a larger" if fraction < 0.5 else "a smaller"  # which side was left empty
        remedy = (f"Give more training images or {size} {flag} (the validation part is always carved from the "
                  f"training images)" if flag == "--validation_split" else
                  f"Give more images, {size} {flag}, or a test split of your own (a Testing/ folder beside "
                  f"Training/, or --test_data_dir)")
        if np.bincount(groups).max() > len(labels) / 2:  # alike images chained into one group (a homogeneous set)
            remedy += (". One group holds most of the images: `mic-diffrep check-leakage --within DATA_DIR` shows "
                       "the near-duplicate groups, and a higher --duplicate_threshold joins fewer images")
        raise ValueError(f"Cannot carve {flag} {fraction} from {len(labels)} images in {len(np.unique(groups))} "
                         f"group(s): one side would be empty; near-duplicate images, the slices of one file and the "
                         f"files of one patient (a patient folder, a DICOM PatientID or series, a BIDS subject) "
                         f"count as one group. {remedy}.") from None


def check_carvable(dataset, fraction: float, seed: int = 0, flag: str = "--test_split") -> None:
    """Raises the probe's error early when a labelled, not yet decoded dataset (`load_image_folder`) cannot be split
    into two parts (`fraction` of it apart: a test or validation part) even before near-duplicates are grouped (by
    its files and patients alone): `mic-diffrep run` checks this before pretraining."""
    names = dataset.features["label"].names
    labels = list(dataset["label"])
    paths = [item["path"] or "" for item in undecoded_images(dataset)["image"]]
    groups = _merge_groups(np.arange(len(labels)), _patients(paths, [names[label] for label in labels]))
    _carve(labels, groups, fraction, seed, flag)


def _decoder(args: ProbeArguments, preprocessing: ImagePreprocessing, accelerator=None):
    """How the probe decodes a split: into its decode cache (`mic-diffrep run`'s, shared with pretraining), the main
    process first when there is an `accelerator`."""
    cache_dir = args.cache_dir or os.path.join(args.output_dir, ".cache")

    def decode(dataset):
        with accelerator.main_process_first() if accelerator else contextlib.nullcontext():
            return decode_images(dataset, preprocessing, skip_bad_images=args.skip_bad_images,
                                 num_workers=args.dataloader_num_workers, cache_dir=cache_dir,
                                 show_progress=accelerator.is_local_main_process if accelerator
                                 else is_first_local_process(), slices=args.slices)
    return decode


def _carve_validation(train: DecodedImages, args: ProbeArguments) -> np.ndarray:
    """The indices of the validation part carved from the training images."""
    groups = _split_groups(train, args.duplicate_threshold or DEFAULT_THRESHOLD)
    return _carve(train.labels, groups, args.validation_split, args.split_seed, "--validation_split")[1]


def carved_test_ids(args: ProbeArguments, preprocessing: ImagePreprocessing) -> List[str]:
    """The ids of the test images a probe with `args` carves from a folder without a test split, after checking that
    its validation part can be carved from the rest: `mic-diffrep run` leaves them out of pretraining (pretraining on
    them would use the test images), and too few images for either split fail before pretraining, not after it."""
    train, test, _, validation_files = _train_and_test(args, _decoder(args, preprocessing))
    if not validation_files:
        _carve_validation(train, args)
    return list(test.paths)


def test_images_seen_in_pretraining(pretrained: Optional[str], test_paths: Sequence[str]) -> Optional[int]:
    """How many of the test images (ids) were pretraining images of the pretrained folder, unlabelled: its summary's
    splits of its data folder, less the files it left out (`--exclude_image_list`), compared by real path. `None`
    when that cannot be told (no local folder or summary, its data folder gone)."""
    try:
        with open(os.path.join(pretrained or "", SUMMARY_FILE), encoding="utf-8") as f:
            summary = json.load(f)
        data_dir = summary["train_data_dir"]
        images = select_splits(load_image_folder(data_dir), summary.get("splits") or None)[1]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    seen = {os.path.realpath(item["path"]) for item in undecoded_images(images)["image"] if item.get("path")}
    if summary.get("exclude_image_list"):
        try:
            left_out = read_image_list(summary["exclude_image_list"], "exclude_image_list", root=data_dir)
        except ValueError:
            return None
        seen -= {os.path.realpath(os.path.join(data_dir, source_file(image_id))) for image_id in left_out}
    return sum(os.path.realpath(source_file(path)) in seen for path in test_paths)


def own_validation_split(splits) -> bool:
    """Whether the data has a validation split of its own (`val/`, `validation/`, ...) beside its training split, the
    validation part a probe uses as it is. Without a training split (`val/` and `test/` alone) its images are
    training images, as they were before validation splits were used."""
    return "validation" in splits and "train" in splits


def _validation_files(splits) -> Optional[set]:
    """The files of the data's own validation split (`own_validation_split`), or `None` without one."""
    if not own_validation_split(splits):
        return None
    return {item["path"] for item in undecoded_images(splits["validation"])["image"]}


def _in_files(images: DecodedImages, files: set) -> np.ndarray:
    """Which rows of `images` come from `files` (a slice from its volume's file)."""
    return np.array([source_file(path) in files for path in images.paths], dtype=bool)


def _train_and_test(args: ProbeArguments, decode):
    splits = load_image_folder(args.data_dir)
    train_splits = [s for s in splits if s != "test"]
    validation_files = _validation_files(splits)
    if args.test_data_dir:
        _, train_set = select_splits(splits, train_splits)
        _, test_set = select_splits(load_image_folder(args.test_data_dir), ["all"], "test_data_dir")
        check_labelled(train_set, args.data_dir)
        # A test folder of one class (another site's glioma cases) reads as that class, as `evaluate` reads it
        test_set = label_by_class_folder(test_set, args.test_data_dir, train_set.features["label"].names)
        check_labelled(test_set, args.test_data_dir)
        train = decode(train_set)
        test = _align_labels(decode(test_set), train.label_names, args.test_data_dir)
        return train, test, f"--test_data_dir {os.path.abspath(args.test_data_dir)}", validation_files
    if "test" in splits and train_splits:
        _, train_set = select_splits(splits, train_splits)
        check_labelled(train_set, args.data_dir)
        check_labelled(splits["test"], args.data_dir)
        train = decode(train_set)
        test = _align_labels(decode(splits["test"]), train.label_names, args.data_dir)
        # as results record data_dir
        return train, test, f"the test split of {os.path.abspath(args.data_dir)}", validation_files
    _, everything = select_splits(splits, ["all"])
    check_labelled(everything, args.data_dir)
    everything = decode(everything)
    threshold = args.duplicate_threshold or DEFAULT_THRESHOLD
    groups = _split_groups(everything, threshold)
    # The data's own validation images stay on the training side, and so does every image grouped with one
    candidates = np.arange(len(everything))
    if validation_files:
        candidates = np.flatnonzero(~np.isin(groups, groups[_in_files(everything, validation_files)]))
        if not len(candidates):
            raise ValueError(f"Cannot carve --test_split {args.test_split} from the training images of "
                             f"{args.data_dir}: every one is a near-duplicate of a validation image (val/), or in a "
                             f"patient folder with one. Give a test split of your own (a test/ folder, or "
                             f"--test_data_dir).")
    _, test_part = _carve(everything.labels[torch.as_tensor(candidates)], groups[candidates], args.test_split,
                          args.split_seed, "--test_split")
    test_idx = candidates[test_part]
    train_idx = np.setdiff1d(np.arange(len(everything)), test_idx)
    what = "its training images" if validation_files else f"{len(everything)} images"
    source = (f"carved from {os.path.abspath(args.data_dir)}: {len(test_idx)} of {what} ({args.test_split:.0%} "
              f"target), stratified by class, near-duplicate groups (fingerprint similarity >= {threshold}) and "
              f"each file's slices and patient's images kept on one side")
    return everything.subset(train_idx), everything.subset(test_idx), source, validation_files


def _validation_leakage(train: DecodedImages, validation_mask: torch.Tensor, threshold: float, data_dir: str) -> str:
    """The data's own validation split is used as it is; those of its images with a near-duplicate among the training
    images (a carved validation part has none) flatter the validation scores that choose layers and timesteps, so
    they are counted, warned about and recorded with the split (`validation_split` in the results and card)."""
    mask = validation_mask.numpy()
    report = check_leakage(train.subset(np.flatnonzero(~mask)), train.subset(np.flatnonzero(mask)), threshold)
    leaked = len(report.leaked_test_indices)
    if not leaked:
        return ""
    logger.warning("%d of the %d validation images of %s have a near-duplicate among its training images: their "
                   "scores flatter the layers and timesteps chosen on them (`mic-diffrep check-leakage --train "
                   "TRAIN_FOLDER --test VALIDATION_FOLDER` lists them).", leaked, int(mask.sum()), data_dir)
    return f" ({leaked} of its {int(mask.sum())} images have a near-duplicate among the training images)"


def check_test_classes(train_classes: Iterable[str], test_classes: Iterable[str]) -> None:
    """Fails naming the classes of test images that have no training images (a probe cannot learn them)."""
    untrained = sorted(set(test_classes) - set(train_classes))
    if untrained:
        raise ValueError(f"Test images of class(es) {untrained} have no training images: a probe cannot learn them. "
                         f"Add training images of these classes or remove them from the test data.")


def load_probe_splits(args: ProbeArguments, preprocessing: ImagePreprocessing, accelerator) -> ProbeSplits:
    """Training and test images (test: `--test_data_dir`, else the data's test split, else a carved hold-out), the
    validation part of training, and which test images have a near-duplicate in training."""
    train, test, source, validation_files = _train_and_test(args, _decoder(args, preprocessing, accelerator))
    check_test_classes({train.label_names[i] for i in train.labels.unique().tolist()},
                       {train.label_names[i] for i in test.labels.unique().tolist()})
    threshold = args.duplicate_threshold or DEFAULT_THRESHOLD
    if validation_files:  # the data's own validation split, as the user made it
        validation_mask = torch.from_numpy(_in_files(train, validation_files))
        if validation_mask.all():
            raise ValueError(f"{args.data_dir} has a validation split but no training images beside it: put the "
                             f"training images in a train/ (or Training/) folder.")
        validation_source = f"the validation split of {os.path.abspath(args.data_dir)}"
        validation_source += _validation_leakage(train, validation_mask, threshold, args.data_dir)
    else:
        validation_mask = torch.zeros(len(train), dtype=torch.bool)
        validation_mask[torch.as_tensor(_carve_validation(train, args), dtype=torch.long)] = True
        validation_source = (f"carved from the training images ({args.validation_split:.0%} target), near-duplicate "
                             f"groups and each file's slices and patient's images kept on one side")
    leakage = check_leakage(train, test, threshold)
    leaked = torch.zeros(len(test), dtype=torch.bool)
    leaked[torch.as_tensor(leakage.leaked_test_indices, dtype=torch.long)] = True
    logger.info("%d of %d test images have a near-duplicate in the training images", int(leaked.sum()), len(test))
    counts = {k: v for k, v in leakage.to_dict().items() if k not in ("pairs", "leaked_test_indices")}
    splits = ProbeSplits(train, test, source, validation_mask=validation_mask, validation_source=validation_source,
                         leaked=leaked, leakage=counts)
    splits.class_warnings = class_warnings(splits)
    for warning in splits.class_warnings:
        logger.warning(warning)
    return splits


# Fewer training images of a class than this: its probe is a guess, whatever the headline accuracy says.
FEW_IMAGES = 5


def class_warnings(splits: ProbeSplits) -> List[str]:
    """What the scores cannot say about some classes: those with fewer than `FEW_IMAGES` training images, none in the
    validation part (layers and timesteps are chosen without them) or none among the test images (no recall)."""
    names, warnings = splits.train.label_names, []
    parts = {"training": splits.train.labels[~splits.validation_mask], "validation": splits.train.labels[
        splits.validation_mask], "test": splits.test.labels}
    counts = {part: torch.bincount(labels, minlength=len(names)).tolist() for part, labels in parts.items()}
    few = [f"{name} ({count})" for name, count in zip(names, counts["training"]) if count < FEW_IMAGES]
    if few:
        warnings.append(f"Class(es) with fewer than {FEW_IMAGES} training images: {', '.join(few)}; their scores "
                        f"mean little.")
    for part, what in (("validation", "layers and timesteps are chosen without them"),
                       ("test", "they have no recall, and the accuracy says nothing of them")):
        missing = [name for name, count in zip(names, counts[part]) if count == 0]
        if missing:
            warnings.append(f"Class(es) without {part} images: {', '.join(missing)}; {what}.")
    return warnings
