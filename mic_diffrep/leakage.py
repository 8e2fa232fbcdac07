"""Exact and near-duplicate images: find them, group them, split around them, and check splits for leakage.

Public brain-MRI collections hold the same slice under several names (re-encoded, re-scaled, shifted,
brightness-changed, mirrored) and neighbouring slices of one scan. A random split puts such twins on both sides
and inflates test accuracy. This module gives every image a small fingerprint, compares fingerprints with blocked
matrix products (tens of thousands of images on a CPU in minutes, with bounded memory), groups near-duplicates
transitively, and splits data so that a group never straddles train and test.

Fingerprint: the image is brought to 64 x 64, re-centred on the centre of mass of its foreground and re-scaled
to the foreground's radius of gyration (so shifted, re-scaled and re-padded copies line up), area-downsampled to
16 x 16, then centred and L2-normalised (so brightness and contrast do not matter). The similarity of two images
is the dot product (cosine) of their fingerprints, or with `mirror=True` (the default) the larger of that and
the dot product with the other's left-right mirror image, since flipped copies are common.
`DEFAULT_THRESHOLD` was calibrated on the Brain Tumor MRI training images (see its comment and the README).

Example:

```python
>>> import torch
>>> from mic_diffrep.leakage import fingerprint_images, find_near_duplicates, duplicate_groups
>>> images = torch.zeros(3, 1, 64, 64, dtype=torch.uint8)
>>> images[0, :, 16:48, 20:44] = 200  # a bright box
>>> images[1, :, 18:50, 22:46] = 120  # the same box, shifted and darker
>>> images[2, :, 10:30, 10:54] = 200  # another shape
>>> fingerprints = fingerprint_images(images)
>>> fingerprints.shape
torch.Size([3, 256])
>>> query_idx, ref_idx, similarity = find_near_duplicates(fingerprints)
>>> query_idx.tolist(), ref_idx.tolist()
([0, 1], [1, 0])
>>> duplicate_groups(fingerprints).tolist()
[0, 0, 1]

```

From the command line (writes a JSON report and a CSV of pairs or groups):

```bash
mic-diffrep check-leakage --train data/Training --test data/Testing --output leakage.json
python -m mic_diffrep.leakage --within data/Training --output duplicates.json  # the same, without the CLI
```
"""

import argparse
import csv
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .data import DecodedImages
from .preprocessing import ImagePreprocessing


# Similarity (cosine of fingerprints, mirrors included) at or above which two images count as near-duplicates.
# Calibrated on the 5,708 Brain Tumor MRI training images by looking at nearest-neighbour pairs: from 0.975 up they
# are the same slice (re-encoded, shifted, re-scaled, brightness-changed or mirrored) or a neighbouring slice of
# the same scan; between 0.96 and 0.975 about one pair in ten is two different patients, and below 0.965 the
# transitive groups start to chain different patients into clusters of hundreds of images.
DEFAULT_THRESHOLD = 0.975
FINGERPRINT_SIZE = 16

_WORK_SIZE = 64  # images are brought to this size before alignment, so fingerprints do not depend on R
_WINDOW = 1.6  # half-width of the aligned window, in radii of gyration of the foreground


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------------------------


def _check_pixels(pixels, name: str = "pixels") -> torch.Tensor:
    if not isinstance(pixels, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor of shape (N, 1, H, W), got {type(pixels).__name__}.")
    if pixels.ndim == 3:
        pixels = pixels.unsqueeze(1)
    if pixels.ndim != 4 or pixels.shape[1] != 1:
        raise ValueError(f"`{name}` must have shape (N, 1, H, W) (one grey channel), got {tuple(pixels.shape)}.")
    if pixels.is_complex() or pixels.dtype == torch.bool:
        raise ValueError(f"`{name}` must hold real grey values, got dtype {pixels.dtype}.")
    return pixels


def _align(images: torch.Tensor) -> torch.Tensor:
    """Re-centres and re-scales `(N, 1, S, S)` float images on their foreground (translation and scale invariance).

    The foreground weight is a soft ramp of the intensity above the image minimum (0 below half the mean, 1 above
    2.5 times the mean), so that it changes smoothly with brightness, contrast, gamma and JPEG noise, and the
    window is centred on its centre of mass with a half-width of `_WINDOW` radii of gyration. Images without
    foreground (constant images) are left as they are.
    """
    n, _, height, width = images.shape
    flat = images.flatten(1)
    low = flat.kthvalue(max(1, flat.shape[1] // 100), dim=1).values  # 1st percentile: robust to resampling undershoot
    images = (images - low.view(n, 1, 1, 1)).clamp_min(0.0)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    weight = ((images - 0.5 * mean) / (2.0 * mean).clamp_min(1e-6)).clamp(0.0, 1.0)[:, 0]
    ys = (torch.arange(height, dtype=images.dtype) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, dtype=images.dtype) + 0.5) / width * 2 - 1
    mass = weight.sum(dim=(1, 2))
    safe_mass = mass.clamp_min(1e-6)
    center_y = (weight * ys[:, None]).sum(dim=(1, 2)) / safe_mass
    center_x = (weight * xs[None, :]).sum(dim=(1, 2)) / safe_mass
    spread = (weight * ((ys[:, None] - center_y[:, None, None]) ** 2 + (xs[None, :] - center_x[:, None, None]) ** 2))
    radius = (spread.sum(dim=(1, 2)) / safe_mass).sqrt()
    degenerate = (mass < 1.0) | (radius < 1e-2)
    scale = torch.where(degenerate, torch.ones_like(radius), _WINDOW * radius)
    theta = torch.zeros(n, 2, 3, dtype=images.dtype)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, 0, 2] = torch.where(degenerate, torch.zeros_like(center_x), center_x)
    theta[:, 1, 2] = torch.where(degenerate, torch.zeros_like(center_y), center_y)
    grid = F.affine_grid(theta, [n, 1, _WORK_SIZE, _WORK_SIZE], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def fingerprint_images(
    pixels: torch.Tensor, size: int = FINGERPRINT_SIZE, align: bool = True, batch_size: int = 4096
) -> torch.Tensor:
    """Compact near-duplicate fingerprints of grey images.

    Args:
        pixels (`torch.Tensor`):
            grey images of shape `(N, 1, H, W)` (or `(N, H, W)`), e.g. the uint8 `DecodedImages.pixels`. Any
            resolution, brightness offset and contrast scale.
        size (`int`, *optional*, defaults to `FINGERPRINT_SIZE`):
            the fingerprint is a `size` x `size` thumbnail; must divide 64. The threshold was calibrated for 16.
        align (`bool`, *optional*, defaults to `True`):
            re-centre and re-scale each image on its foreground first, so shifted and re-scaled copies match.
        batch_size (`int`, *optional*, defaults to 4096): images processed at once (bounds memory).

    Returns:
        `torch.Tensor` of shape `(N, size * size)`, float32, zero mean and unit L2 norm per row (all zeros for a
        constant image, which therefore matches nothing; `exact_keys` still finds its exact copies).
    """
    pixels = _check_pixels(pixels)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or _WORK_SIZE % size != 0:
        raise ValueError(f"`size` must be a positive divisor of {_WORK_SIZE}, got {size!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    out = torch.empty(len(pixels), size * size, dtype=torch.float32)
    for start in range(0, len(pixels), batch_size):
        images = pixels[start : start + batch_size].to("cpu", torch.float32)
        height, width = images.shape[-2:]
        if height >= _WORK_SIZE and width >= _WORK_SIZE:
            images = F.interpolate(images, size=(_WORK_SIZE, _WORK_SIZE), mode="area")
        else:
            images = F.interpolate(images, size=(_WORK_SIZE, _WORK_SIZE), mode="bilinear", align_corners=False)
        if align:
            images = _align(images)
        thumbs = F.avg_pool2d(images, _WORK_SIZE // size).flatten(1)
        thumbs = thumbs - thumbs.mean(dim=1, keepdim=True)
        out[start : start + len(thumbs)] = F.normalize(thumbs, dim=1, eps=1e-6)
    return out


def exact_keys(pixels: torch.Tensor) -> List[str]:
    """SHA-1 of each image's pixel bytes: equal keys mean pixel-identical images (at the decoded resolution)."""
    pixels = _check_pixels(pixels).cpu()
    if pixels.dtype in (torch.float16, torch.bfloat16):  # no numpy counterpart
        pixels = pixels.float()
    pixels = pixels.contiguous()
    return [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in pixels]


def mirror_fingerprints(fingerprints: torch.Tensor) -> torch.Tensor:
    """Fingerprints of the left-right mirrored images, computed from the fingerprints themselves.

    `fingerprint_images` commutes with a horizontal flip, so this equals `fingerprint_images(pixels.flip(-1))`.
    """
    fingerprints = _check_fingerprints(fingerprints, "fingerprints")
    size = math.isqrt(fingerprints.shape[1])
    if size * size != fingerprints.shape[1]:
        raise ValueError(
            f"`fingerprints` must have size * size columns to be mirrored (from `fingerprint_images`), got "
            f"{fingerprints.shape[1]}; pass `mirror=False` for other features."
        )
    return fingerprints.view(-1, size, size).flip(-1).reshape(len(fingerprints), -1)


# ---------------------------------------------------------------------------------------------------------------
# Blocked similarity search
# ---------------------------------------------------------------------------------------------------------------


def _check_fingerprints(fingerprints, name: str) -> torch.Tensor:
    if not isinstance(fingerprints, torch.Tensor) or fingerprints.ndim != 2:
        shape = tuple(fingerprints.shape) if isinstance(fingerprints, torch.Tensor) else type(fingerprints).__name__
        raise ValueError(f"`{name}` must be a 2-D tensor (N, D) from `fingerprint_images`, got {shape}.")
    if not fingerprints.is_floating_point():
        raise ValueError(f"`{name}` must be a float tensor, got dtype {fingerprints.dtype}.")
    return fingerprints.float()


def _check_threshold(threshold, allow_none: bool = False) -> None:
    if threshold is None and allow_none:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 <= threshold <= 1.0:
        raise ValueError(f"`threshold` must be a cosine similarity in [-1, 1], got {threshold!r}.")


def _check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"`block_size` must be a positive integer, got {block_size!r}.")


def _similarity_block(rows: torch.Tensor, mirrored_rows: Optional[torch.Tensor], columns: torch.Tensor) -> torch.Tensor:
    """Cosine similarities of `rows` to `columns`, or with mirrors the larger of the direct and mirrored ones."""
    sims = rows @ columns.T
    if mirrored_rows is not None:
        sims = torch.maximum(sims, mirrored_rows @ columns.T)
    return sims


def pair_similarity(a: torch.Tensor, b: torch.Tensor, mirror: bool = True) -> Tuple[float, bool]:
    """Similarity of two fingerprints (1-D) and whether the mirrored comparison gave it."""
    direct = float(a @ b)
    if not mirror:
        return direct, False
    mirrored = float(mirror_fingerprints(a[None])[0] @ b)
    return (mirrored, True) if mirrored > direct else (direct, False)


def find_near_duplicates(
    query_fp: torch.Tensor,
    reference_fp: Optional[torch.Tensor] = None,
    threshold: Optional[float] = DEFAULT_THRESHOLD,
    block_size: int = 4096,
    mirror: bool = True,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Most similar reference image of every query image, computed block by block.

    Memory stays at a few `block_size` x `block_size` similarity blocks whatever the number of images; 50,000 x
    50,000 fingerprints take about a minute on one CPU core.

    Args:
        query_fp (`torch.Tensor`): fingerprints `(Nq, D)` from `fingerprint_images`.
        reference_fp (`torch.Tensor`, *optional*):
            fingerprints `(Nr, D)` to search. `None` searches `query_fp` itself, never matching an image to itself
            (its exact copies still match).
        threshold (`float`, *optional*, defaults to `DEFAULT_THRESHOLD`):
            only queries whose best similarity is at least this are returned; `None` returns every query that has
            a reference to compare with.
        block_size (`int`, *optional*, defaults to 4096): rows and columns of one block of the similarity matrix.
        mirror (`bool`, *optional*, defaults to `True`): also match left-right mirrored copies (twice the work).

    Returns:
        `(query_idx, ref_idx, similarity)`: numpy arrays (int64, int64, float32) of the same length, sorted by
        query index. Ties go to the lowest reference index.
    """
    query_fp = _check_fingerprints(query_fp, "query_fp")
    within = reference_fp is None
    reference_fp = query_fp if within else _check_fingerprints(reference_fp, "reference_fp")
    if reference_fp.shape[1] != query_fp.shape[1]:
        raise ValueError(
            f"`reference_fp` has {reference_fp.shape[1]} dimensions but `query_fp` has {query_fp.shape[1]}; "
            f"compute both with the same `fingerprint_images` settings."
        )
    _check_threshold(threshold, allow_none=True)
    _check_block_size(block_size)
    mirrored_fp = mirror_fingerprints(query_fp) if mirror else None
    num_queries, num_refs = len(query_fp), len(reference_fp)
    best_sim = torch.full((num_queries,), -float("inf"))
    best_idx = torch.full((num_queries,), -1, dtype=torch.long)
    for q_start in range(0, num_queries, block_size):
        q_end = min(q_start + block_size, num_queries)
        q_mirrored = None if mirrored_fp is None else mirrored_fp[q_start:q_end]
        block_best = torch.full((q_end - q_start,), -float("inf"))
        block_idx = torch.full((q_end - q_start,), -1, dtype=torch.long)
        for r_start in range(0, num_refs, block_size):
            r_end = min(r_start + block_size, num_refs)
            sims = _similarity_block(query_fp[q_start:q_end], q_mirrored, reference_fp[r_start:r_end])
            if within and r_start < q_end and q_start < r_end:  # blank out self-matches on the diagonal
                diagonal = torch.arange(max(q_start, r_start), min(q_end, r_end))
                sims[diagonal - q_start, diagonal - r_start] = -float("inf")
            values, indices = sims.max(dim=1)
            better = values > block_best  # strict: earlier (lower) reference indices win ties
            block_best = torch.where(better, values, block_best)
            block_idx = torch.where(better, indices + r_start, block_idx)
        best_sim[q_start:q_end] = block_best
        best_idx[q_start:q_end] = block_idx
    keep = best_idx >= 0
    if threshold is not None:
        keep &= best_sim >= threshold
    query_idx = keep.nonzero().flatten()
    return (
        query_idx.numpy().astype(np.int64),
        best_idx[query_idx].numpy().astype(np.int64),
        best_sim[query_idx].numpy().astype(np.float32),
    )


def _compress(parent: np.ndarray) -> None:
    """Points every node straight at its root (pointer jumping); roots have `parent[i] == i`."""
    while True:
        grandparent = parent[parent]
        if np.array_equal(grandparent, parent):
            return
        parent[:] = grandparent


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Merges the sets of every pair `(a[k], b[k])`: a vectorised union-find that always hooks the larger root
    under the smaller one (so parents only ever point to lower indices and no cycle can form)."""
    while len(a):
        _compress(parent)
        root_a, root_b = parent[a], parent[b]
        apart = root_a != root_b
        if not apart.any():
            return
        a, b, root_a, root_b = a[apart], b[apart], root_a[apart], root_b[apart]
        np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))


def _groups_from_parent(parent: np.ndarray) -> np.ndarray:
    _compress(parent)
    _, group_ids = np.unique(parent, return_inverse=True)  # roots are the lowest member: ids in order of appearance
    return group_ids.astype(np.int64)


def _exact_pairs(keys: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    first: Dict[str, int] = {}
    a, b = [], []
    for index, key in enumerate(keys):
        if key in first:
            a.append(first[key])
            b.append(index)
        else:
            first[key] = index
    return np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)


def duplicate_groups(
    fingerprints: torch.Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    block_size: int = 4096,
    keys: Optional[Sequence[str]] = None,
    mirror: bool = True,
) -> np.ndarray:
    """Group ids such that images linked by a chain of near-duplicate pairs share a group.

    Every pair with similarity >= `threshold` is found with blocked matrix products over the upper triangle of the
    similarity matrix and merged by union-find, so groups are transitive (A~B and B~C put A, B, C together).

    Args:
        fingerprints (`torch.Tensor`): fingerprints `(N, D)` from `fingerprint_images`.
        threshold (`float`, *optional*, defaults to `DEFAULT_THRESHOLD`): similarity that links two images.
        block_size (`int`, *optional*, defaults to 4096): rows and columns of one block of the similarity matrix.
        keys (`Sequence[str]`, *optional*):
            `exact_keys` of the same images; images with equal keys are grouped too (this catches exact copies of
            constant images, whose fingerprints match nothing).
        mirror (`bool`, *optional*, defaults to `True`): also link left-right mirrored copies.

    Returns:
        `np.ndarray` of int64 group ids, numbered 0, 1, ... in order of each group's first image.
    """
    fingerprints = _check_fingerprints(fingerprints, "fingerprints")
    _check_threshold(threshold)
    _check_block_size(block_size)
    num_images = len(fingerprints)
    if keys is not None and len(keys) != num_images:
        raise ValueError(f"`keys` has {len(keys)} entries but there are {num_images} fingerprints.")
    mirrored_fp = mirror_fingerprints(fingerprints) if mirror else None
    parent = np.arange(num_images, dtype=np.int64)
    if keys is not None:
        _union(parent, *_exact_pairs(keys))
    for start in range(0, num_images, block_size):
        rows = fingerprints[start : start + block_size]
        mirrored_rows = None if mirrored_fp is None else mirrored_fp[start : start + block_size]
        # Mirroring is an orthogonal involution, so the (max-of-mirrored) similarity stays symmetric and the upper
        # triangle of blocks is enough.
        for other in range(start, num_images, block_size):
            above = _similarity_block(rows, mirrored_rows, fingerprints[other : other + block_size]) >= threshold
            if other == start:
                above = above.triu(diagonal=1)
            pairs = above.nonzero().numpy()
            if len(pairs):
                _union(parent, pairs[:, 0] + start, pairs[:, 1] + other)
    return _groups_from_parent(parent)


# ---------------------------------------------------------------------------------------------------------------
# Group-aware split
# ---------------------------------------------------------------------------------------------------------------


def group_stratified_split(
    labels: Optional[Union[Sequence[int], np.ndarray, torch.Tensor]],
    groups: Union[Sequence[int], np.ndarray, torch.Tensor],
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Tuple[np.ndarray, np.ndarray]:
    """Train/test indices that keep every group on one side and roughly preserve the label proportions.

    Groups are visited in a seeded random order; a group goes to test when adding it brings the per-label test
    counts closer to `test_fraction` of each label's count (summed absolute error), otherwise to train. Groups
    with mixed labels are counted under all their labels.

    Args:
        labels (`Sequence`, *optional*): label per image (ints or strings); `None` for unlabelled images.
        groups (`Sequence[int]`): group id per image, e.g. from `duplicate_groups`.
        test_fraction (`float`, *optional*, defaults to 0.2): target share of test images, in (0, 1).
        seed (`int`, *optional*, defaults to 0): the same seed always gives the same split.

    Returns:
        `(train_indices, test_indices)`: sorted int64 numpy arrays that together cover every index exactly once.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) == 0 or not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(f"`groups` must be a non-empty 1-D sequence of integer group ids, got shape {groups.shape}.")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction!r}.")
    if labels is None:
        label_codes = np.zeros(len(groups), dtype=np.int64)
    else:
        labels = np.asarray(labels)
        if labels.shape != groups.shape:
            raise ValueError(
                f"`labels` must hold one label per image like `groups` ({len(groups)}), got shape {labels.shape}."
            )
        _, label_codes = np.unique(labels, return_inverse=True)
    _, group_codes = np.unique(groups, return_inverse=True)
    num_groups, num_labels = group_codes.max() + 1, label_codes.max() + 1
    counts = np.zeros((num_groups, num_labels), dtype=np.int64)
    np.add.at(counts, (group_codes, label_codes), 1)
    target = test_fraction * counts.sum(axis=0)
    in_test = np.zeros(num_groups, dtype=bool)
    test_counts = np.zeros(num_labels, dtype=np.float64)
    error = np.abs(test_counts - target).sum()
    for group in np.random.default_rng(seed).permutation(num_groups):
        candidate = test_counts + counts[group]
        candidate_error = np.abs(candidate - target).sum()
        if candidate_error < error:
            in_test[group], test_counts, error = True, candidate, candidate_error
    test_mask = in_test[group_codes]
    if test_mask.all() or not test_mask.any():
        raise ValueError(
            f"Cannot split {len(groups)} images in {num_groups} group(s) with test_fraction={test_fraction}: one "
            f"side would be empty (the groups are too large)."
        )
    return np.flatnonzero(~test_mask).astype(np.int64), np.flatnonzero(test_mask).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------


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
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _write_json(path: str, data: Dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
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
    _check_threshold(threshold)
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
    _check_threshold(threshold)
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
    )


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _decode_folder(folder: str, args) -> DecodedImages:
    from .data import decode_images, load_image_folder, select_splits

    _, dataset = select_splits(load_image_folder(folder), ["all"])
    return decode_images(
        dataset, ImagePreprocessing(args.resolution, args.resize_mode, args.intensity_window),
        skip_bad_images=args.skip_bad_images,
        num_workers=args.num_workers, cache_dir=args.cache_dir,
    )


def add_leakage_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the flags of `mic-diffrep check-leakage` (and `python -m mic_diffrep.leakage`) to `parser`."""
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--within", metavar="DIR", help="Group the exact and near-duplicates within this image folder.")
    mode.add_argument("--train", metavar="DIR", help="Training image folder (with --test).")
    parser.add_argument("--test", metavar="DIR", help="Test image folder, checked against --train.")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"Fingerprint similarity that makes a near-duplicate (default {DEFAULT_THRESHOLD}).")
    parser.add_argument("--no_mirror", action="store_true", help="Do not match left-right mirrored copies.")
    parser.add_argument("--resolution", type=int, default=64,
                        help="Decode resolution; exact duplicates are compared at it (default 64).")
    parser.add_argument("--resize_mode", default="pad", choices=("pad", "center_crop"), help="As for training.")
    parser.add_argument("--intensity_window", default="percentile", choices=("percentile", "none"),
                        help="As for training.")
    parser.add_argument("--num_workers", type=int, default=0, help="Decoding processes.")
    parser.add_argument("--cache_dir", default=None, help="Where to cache the decoded images.")
    parser.add_argument("--skip_bad_images", action="store_true", help="Skip unreadable images instead of failing.")
    parser.add_argument("--output", default=None,
                        help="JSON report to write; the pairs (or groups) go to a CSV file beside it.")
    return parser


def run_check(args: argparse.Namespace) -> Union[LeakageReport, DuplicateGroupsReport]:
    """Runs the check that `add_leakage_args` flags describe, prints a summary and writes the report files."""
    if (args.train is None) != (args.test is None):
        raise ValueError("--train and --test go together (or use --within DIR).")
    if args.within is not None:
        report = within_duplicates(_decode_folder(args.within, args), args.threshold, mirror=not args.no_mirror)
        mixed = "" if report.num_mixed_label_groups is None else f", {report.num_mixed_label_groups} with mixed labels"
        print(
            f"{report.num_images_in_groups} of {report.num_images} images are in {report.num_duplicate_groups} "
            f"duplicate groups at threshold {report.threshold} ({report.num_exact_duplicates} exact copies{mixed}); "
            f"{report.num_groups} groups in all."
        )
    else:
        train, test = _decode_folder(args.train, args), _decode_folder(args.test, args)
        report = check_leakage(train, test, args.threshold, mirror=not args.no_mirror)
        labels = (
            "" if report.num_same_label is None
            else f", {report.num_same_label} same label, {report.num_different_label} different label"
        )
        print(
            f"{report.num_near} of {report.num_test} test images ({report.leaked_fraction:.1%}) have a near-duplicate "
            f"in train at threshold {report.threshold} ({report.num_exact} exact, {report.num_mirrored} mirrored"
            f"{labels})."
        )
    if args.output is not None:
        report.save(args.output)
        report.save_csv(os.path.splitext(args.output)[0] + ".csv")
        print(f"Report written to {args.output}")
    return report


def main(argv: Optional[Sequence[str]] = None) -> Union[LeakageReport, DuplicateGroupsReport]:
    parser = argparse.ArgumentParser(
        prog="python -m mic_diffrep.leakage",
        description="Find test images with a near-identical training image (--train, --test), or duplicate groups "
                    "within one folder (--within).",
    )
    args = add_leakage_args(parser).parse_args(argv)
    try:
        return run_check(args)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
