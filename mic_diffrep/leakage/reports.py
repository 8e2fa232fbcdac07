"""Leakage reports: test images with a twin in the training images, and duplicate groups within one set."""

import csv
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ..data.decoding import DecodedImages, merge_skipped
from ..utils import write_json
from .fingerprints import DEFAULT_THRESHOLD, exact_keys, fingerprint_images
from .groups import duplicate_groups
from .search import check_threshold, find_near_duplicates, pair_similarity


def _label_name(images: DecodedImages, index: int) -> Optional[Union[str, int]]:
    if images.labels is None:
        return None
    label = int(images.labels[index])
    if images.label_names is not None and 0 <= label < len(images.label_names):
        return images.label_names[label]
    return label


def _write_csv(path: str, rows: List[Dict], columns: Sequence[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _write_json(path: str, data: Dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(path, data)
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n")


@dataclass
class LeakageReport:
    """Test images that have an exact or near-duplicate in the training images.

    Attributes:
        threshold (`float`): similarity at or above which a pair counts as a near-duplicate.
        num_train, num_test (`int`): image counts.
        num_exact (`int`): test images with a pixel-identical training image.
        num_near (`int`): test images with a training image at similarity >= `threshold`, exact ones included.
        num_same_label, num_different_label (`int`, *optional*):
            among the `num_near`, how many share the label of their training twin (`None` without labels).
        num_mirrored (`int`): among the `num_near`, how many match a left-right mirrored training image.
        leaked_test_indices (`List[int]`): indices into the test images of the `num_near` leaked images.
        pairs (`List[dict]`):
            one entry per leaked test image: `test_path`, `train_path`, `similarity`, `exact`, `mirrored`,
            `test_label`, `train_label` (the exact twin when there is one, else the most similar training image).
        skipped_images (`List[dict]`): unreadable files left out with `skip_bad_images` (`path`, `error`).
    """

    threshold: float
    num_train: int
    num_test: int
    num_exact: int
    num_near: int
    num_same_label: Optional[int] = None
    num_different_label: Optional[int] = None
    num_mirrored: int = 0
    leaked_test_indices: List[int] = field(default_factory=list)
    pairs: List[Dict] = field(default_factory=list)
    skipped_images: List[Dict] = field(default_factory=list)

    @property
    def leaked_fraction(self) -> float:
        return self.num_near / self.num_test if self.num_test else 0.0

    def to_dict(self) -> Dict:
        return {**asdict(self), "leaked_fraction": self.leaked_fraction}

    def save(self, path: str) -> None:
        """Writes the report as JSON."""
        _write_json(path, self.to_dict())

    def save_csv(self, path: str) -> None:
        """Writes `pairs` as CSV, one row per leaked test image."""
        columns = ("test_path", "train_path", "similarity", "exact", "mirrored", "test_label", "train_label")
        _write_csv(path, self.pairs, columns)


def check_leakage(
    train: DecodedImages,
    test: DecodedImages,
    threshold: float = DEFAULT_THRESHOLD,
    block_size: int = 4096,
    mirror: bool = True,
) -> LeakageReport:
    """Finds test images with an exact or near-duplicate among the training images.

    Args:
        train (`DecodedImages`): training images, from `decode_images`.
        test (`DecodedImages`): test images, decoded at the same resolution and resize mode.
        threshold (`float`, *optional*, defaults to `DEFAULT_THRESHOLD`): near-duplicate similarity.
        block_size (`int`, *optional*, defaults to 4096): see `find_near_duplicates`.
        mirror (`bool`, *optional*, defaults to `True`): also match left-right mirrored copies.

    Returns:
        `LeakageReport`. Labels are compared by name when both sets have `label_names`, else by integer value.
    """
    for name, images in (("train", train), ("test", test)):
        if not isinstance(images, DecodedImages):
            raise ValueError(f"`{name}` must be `DecodedImages` (from `decode_images`), got {type(images).__name__}.")
        if len(images) == 0:
            raise ValueError(f"`{name}` holds no images.")
    if train.pixels.shape[1:] != test.pixels.shape[1:]:
        raise ValueError(
            f"`test` pixels have shape {tuple(test.pixels.shape[1:])} but `train` pixels have "
            f"{tuple(train.pixels.shape[1:])}; decode both at the same resolution so exact duplicates can be compared."
        )
    check_threshold(threshold)
    train_fp, test_fp = fingerprint_images(train.pixels), fingerprint_images(test.pixels)
    train_index: Dict[str, int] = {}
    for index, key in enumerate(exact_keys(train.pixels)):
        train_index.setdefault(key, index)
    _, nearest, similarity = find_near_duplicates(
        test_fp, train_fp, threshold=None, block_size=block_size, mirror=mirror
    )
    has_labels = train.labels is not None and test.labels is not None
    report = LeakageReport(
        threshold=float(threshold), num_train=len(train), num_test=len(test), num_exact=0, num_near=0,
        num_same_label=0 if has_labels else None, num_different_label=0 if has_labels else None,
        skipped_images=merge_skipped(train, test),
    )
    for index, key in enumerate(exact_keys(test.pixels)):
        twin = train_index.get(key)
        if twin is None and similarity[index] < threshold:
            continue
        match = int(nearest[index]) if twin is None else twin
        pair_sim, mirrored = pair_similarity(test_fp[index], train_fp[match], mirror=mirror and twin is None)
        test_label, train_label = _label_name(test, index), _label_name(train, match)
        report.num_exact += twin is not None
        report.num_near += 1
        report.num_mirrored += mirrored
        if has_labels:
            report.num_same_label += test_label == train_label
            report.num_different_label += test_label != train_label
        report.leaked_test_indices.append(index)
        report.pairs.append({
            "test_path": test.paths[index],
            "train_path": train.paths[match],
            "similarity": round(pair_sim, 6),
            "exact": twin is not None,
            "mirrored": mirrored,
            "test_label": test_label,
            "train_label": train_label,
        })
    return report


@dataclass
class DuplicateGroupsReport:
    """Near-duplicate groups within one set of images.

    Attributes:
        threshold (`float`): similarity at or above which two images are linked.
        num_images (`int`): image count.
        num_groups (`int`): groups including singletons (what `group_stratified_split` sees).
        num_duplicate_groups (`int`): groups of two images or more.
        num_images_in_groups (`int`): images in those groups.
        num_exact_duplicates (`int`): images pixel-identical to an earlier image.
        num_mixed_label_groups (`int`, *optional*): duplicate groups holding more than one label.
        group_ids (`List[int]`): group id of every image.
        groups (`List[dict]`): the duplicate groups, largest first: `group`, `size`, `labels`, `paths`.
        skipped_images (`List[dict]`): unreadable files left out with `skip_bad_images` (`path`, `error`).
    """

    threshold: float
    num_images: int
    num_groups: int
    num_duplicate_groups: int
    num_images_in_groups: int
    num_exact_duplicates: int
    num_mixed_label_groups: Optional[int] = None
    group_ids: List[int] = field(default_factory=list)
    groups: List[Dict] = field(default_factory=list)
    skipped_images: List[Dict] = field(default_factory=list)

    def to_dict(self) -> Dict:
        return asdict(self)

    def save(self, path: str) -> None:
        """Writes the report as JSON."""
        _write_json(path, self.to_dict())

    def save_csv(self, path: str) -> None:
        """Writes one row per image of a duplicate group: `group`, `size`, `path`, `label`."""
        rows = [
            {"group": group["group"], "size": group["size"], "path": path, "label": label}
            for group in self.groups
            for path, label in zip(group["paths"], group["labels"] or [None] * group["size"])
        ]
        _write_csv(path, rows, ("group", "size", "path", "label"))


def within_duplicates(
    images: DecodedImages, threshold: float = DEFAULT_THRESHOLD, block_size: int = 4096, mirror: bool = True
) -> DuplicateGroupsReport:
    """Groups the exact and near-duplicates within one set of images (see `duplicate_groups`).

    Args:
        images (`DecodedImages`): images from `decode_images`.
        threshold (`float`, *optional*, defaults to `DEFAULT_THRESHOLD`): near-duplicate similarity.
        block_size (`int`, *optional*, defaults to 4096): see `duplicate_groups`.
        mirror (`bool`, *optional*, defaults to `True`): also group left-right mirrored copies.

    Returns:
        `DuplicateGroupsReport`; its `group_ids` can go straight to `group_stratified_split`.
    """
    if not isinstance(images, DecodedImages):
        raise ValueError(f"`images` must be `DecodedImages` (from `decode_images`), got {type(images).__name__}.")
    if len(images) == 0:
        raise ValueError("`images` holds no images.")
    check_threshold(threshold)
    keys = exact_keys(images.pixels)
    group_ids = duplicate_groups(
        fingerprint_images(images.pixels), threshold, block_size=block_size, keys=keys, mirror=mirror
    )
    sizes = np.bincount(group_ids)
    members: Dict[int, List[int]] = {}
    for index, group in enumerate(group_ids.tolist()):
        if sizes[group] > 1:
            members.setdefault(group, []).append(index)
    groups = []
    for group, indices in sorted(members.items(), key=lambda item: (-len(item[1]), item[0])):
        labels = None if images.labels is None else [_label_name(images, i) for i in indices]
        paths = [images.paths[i] for i in indices]
        groups.append({"group": group, "size": len(indices), "labels": labels, "paths": paths})
    return DuplicateGroupsReport(
        threshold=float(threshold),
        num_images=len(images),
        num_groups=len(sizes),
        num_duplicate_groups=len(groups),
        num_images_in_groups=int(sizes[sizes > 1].sum()),
        num_exact_duplicates=len(keys) - len(set(keys)),
        num_mixed_label_groups=None if images.labels is None else sum(len(set(g["labels"])) > 1 for g in groups),
        group_ids=group_ids.tolist(),
        groups=groups,
        skipped_images=list(images.skipped),
    )
