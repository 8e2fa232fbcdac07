"""Near-duplicate fingerprints of grey images, and exact pixel keys.

Fingerprint: the image is brought to 64 x 64, re-centred on the centre of mass of its foreground and re-scaled
to the foreground's radius of gyration (so shifted, re-scaled and re-padded copies line up), area-downsampled to
16 x 16, then centred and L2-normalised (so brightness and contrast do not matter). The similarity of two images
is the dot product (cosine) of their fingerprints, or with `mirror=True` the larger of that and the dot product
with the other's left-right mirror image (`mirror_fingerprints`), since flipped copies are common.
"""

import hashlib
import math
from typing import List

import numpy as np
import torch
import torch.nn.functional as F


# Similarity (cosine of fingerprints, mirrors included) at or above which two images count as near-duplicates.
# Calibrated on the 5,708 Brain Tumor MRI training images by looking at nearest-neighbour pairs: from 0.975 up they
# are the same slice (re-encoded, shifted, re-scaled, brightness-changed or mirrored) or a neighbouring slice of
# the same scan; between 0.96 and 0.975 about one pair in ten is two different patients, and below 0.965 the
# transitive groups start to chain different patients into clusters of hundreds of images.
DEFAULT_THRESHOLD = 0.975
FINGERPRINT_SIZE = 16

_WORK_SIZE = 64  # images are brought to this size before alignment, so fingerprints do not depend on R
_WINDOW = 1.6  # half-width of the aligned window, in radii of gyration of the foreground


def _check_pixels(pixels, name: str = "pixels") -> torch.Tensor:
    if isinstance(pixels, np.ndarray):  # a notebook's arrays, as the tensors
        pixels = torch.from_numpy(pixels)
    if not isinstance(pixels, torch.Tensor):
        raise ValueError(f"`{name}` must be a tensor or array of shape (N, 1, H, W), got {type(pixels).__name__}.")
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


def _check_fingerprints(fingerprints, name: str) -> torch.Tensor:
    if not isinstance(fingerprints, torch.Tensor) or fingerprints.ndim != 2:
        shape = tuple(fingerprints.shape) if isinstance(fingerprints, torch.Tensor) else type(fingerprints).__name__
        raise ValueError(f"`{name}` must be a 2-D tensor (N, D) from `fingerprint_images`, got {shape}.")
    if not fingerprints.is_floating_point():
        raise ValueError(f"`{name}` must be a float tensor, got dtype {fingerprints.dtype}.")
    return fingerprints.float()
