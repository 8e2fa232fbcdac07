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
mic-diffrep check-leakage --within data/Training --output duplicates.json
```

Modules: `fingerprints` (fingerprints, exact keys, mirrors), `search` (blocked nearest-neighbour search), `groups`
(union-find groups, group-aware splits), `reports` (`check_leakage`, `within_duplicates`).
"""

from .fingerprints import DEFAULT_THRESHOLD, FINGERPRINT_SIZE, exact_keys, fingerprint_images, mirror_fingerprints
from .groups import duplicate_groups, group_stratified_split
from .reports import DuplicateGroupsReport, LeakageReport, check_leakage, within_duplicates
from .search import find_near_duplicates, pair_similarity


__all__ = ["DEFAULT_THRESHOLD", "DuplicateGroupsReport", "FINGERPRINT_SIZE", "LeakageReport", "check_leakage",
           "duplicate_groups", "exact_keys", "find_near_duplicates", "fingerprint_images", "group_stratified_split",
           "mirror_fingerprints", "pair_similarity", "within_duplicates"]
