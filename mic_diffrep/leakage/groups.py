"""Near-duplicate groups (vectorised union-find over blocked similarity search) and group-aware splits."""

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .fingerprints import DEFAULT_THRESHOLD, _check_fingerprints, mirror_fingerprints
from .search import _check_block_size, _similarity_block, block_progress, check_threshold


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
    check_threshold(threshold)
    _check_block_size(block_size)
    num_images = len(fingerprints)
    if keys is not None and len(keys) != num_images:
        raise ValueError(f"`keys` has {len(keys)} entries but there are {num_images} fingerprints.")
    mirrored_fp = mirror_fingerprints(fingerprints) if mirror else None
    parent = np.arange(num_images, dtype=np.int64)
    if keys is not None:
        _union(parent, *_exact_pairs(keys))
    num_blocks = -(-num_images // block_size)
    progress = block_progress(num_blocks * (num_blocks + 1) // 2, "Grouping near-duplicates")
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
            progress.update()
    progress.close()
    return _groups_from_parent(parent)


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
    if isinstance(test_fraction, (bool, np.bool_)) or not isinstance(test_fraction, (int, float, np.number)) or \
            not 0 < test_fraction < 1:
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
