"""Blocked similarity search over fingerprints: every query's most similar reference, in bounded memory."""

from typing import Optional, Tuple

import numpy as np
import torch

from tqdm.auto import tqdm

from ..utils import progress_interval
from .fingerprints import DEFAULT_THRESHOLD, _check_fingerprints, mirror_fingerprints


def check_threshold(threshold, allow_none: bool = False, name: str = "threshold") -> None:
    """Fails with a `ValueError` naming setting `name` unless `threshold` is a cosine similarity in [-1, 1]."""
    if threshold is None and allow_none:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 <= threshold <= 1.0:
        raise ValueError(f"`{name}` must be a cosine similarity in [-1, 1], got {threshold!r}.")


def _check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"`block_size` must be a positive integer, got {block_size!r}.")


def block_progress(num_blocks: int, desc: str) -> tqdm:
    """A bar over the blocks of a similarity search (quadratic in the images: minutes for 100,000 of them), shown
    only when the search takes more than 2 s."""
    return tqdm(total=num_blocks, desc=desc, unit="block", delay=2, mininterval=progress_interval())


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
    check_threshold(threshold, allow_none=True)
    _check_block_size(block_size)
    mirrored_fp = mirror_fingerprints(query_fp) if mirror else None
    num_queries, num_refs = len(query_fp), len(reference_fp)
    best_sim = torch.full((num_queries,), -float("inf"))
    best_idx = torch.full((num_queries,), -1, dtype=torch.long)
    progress = block_progress(-(-num_queries // block_size) * -(-num_refs // block_size), "Searching near-duplicates")
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
            progress.update()
        best_sim[q_start:q_end] = block_best
        best_idx[q_start:q_end] = block_idx
    progress.close()
    keep = best_idx >= 0
    if threshold is not None:
        keep &= best_sim >= threshold
    query_idx = keep.nonzero().flatten()
    return (
        query_idx.numpy().astype(np.int64),
        best_idx[query_idx].numpy().astype(np.int64),
        best_sim[query_idx].numpy().astype(np.float32),
    )
