"""Batched augmentations for grey MRI slices in [-1, 1] (torchvision is not needed), for MoCo v2 and BYOL views.

```python
>>> import torch
>>> from mic_diffrep.data.augmentations import GreyAugment
>>> views = GreyAugment()(torch.rand(8, 1, 32, 32) * 2 - 1, generator=torch.Generator().manual_seed(0))
>>> views.shape, bool(views.min() >= -1), bool(views.max() <= 1)
(torch.Size([8, 1, 32, 32]), True, True)

```
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def _uniform(shape, low, high, generator, device):
    return torch.rand(shape, generator=generator).to(device) * (high - low) + low


def random_resized_crop(images: torch.Tensor, scale: Tuple[float, float] = (0.4, 1.0),
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3), generator=None) -> torch.Tensor:
    """Crops a random area (`scale` of the image, aspect `ratio`) of each image and resizes it back (bilinear)."""
    batch = images.shape[0]
    area = _uniform(batch, *scale, generator, images.device)
    log_ratio = _uniform(batch, math.log(ratio[0]), math.log(ratio[1]), generator, images.device)
    aspect = log_ratio.exp()
    width = (area * aspect).sqrt().clamp(max=1.0)
    height = (area / aspect).sqrt().clamp(max=1.0)
    center_x = (_uniform(batch, 0, 1, generator, images.device) * 2 - 1) * (1 - width)
    center_y = (_uniform(batch, 0, 1, generator, images.device) * 2 - 1) * (1 - height)
    theta = torch.zeros(batch, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = width, center_x
    theta[:, 1, 1], theta[:, 1, 2] = height, center_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_flip(images: torch.Tensor, p: float = 0.5, generator=None) -> torch.Tensor:
    flip = (torch.rand(images.shape[0], generator=generator) < p).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def intensity_jitter(images: torch.Tensor, brightness: float = 0.2, contrast: float = 0.2, gamma: float = 0.2,
                     generator=None) -> torch.Tensor:
    """Random brightness shift, contrast scaling (around each image's mean) and gamma, per image; stays in [-1, 1]."""
    batch, device = images.shape[0], images.device
    x = (images + 1) / 2
    x = x + _uniform(batch, -brightness, brightness, generator, device)[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * _uniform(batch, 1 - contrast, 1 + contrast, generator, device)[:, None, None, None] + mean
    x = x.clamp(0, 1) ** _uniform(batch, 1 - gamma, 1 + gamma, generator, device)[:, None, None, None]
    return x * 2 - 1


def gaussian_blur(images: torch.Tensor, sigma: Tuple[float, float] = (0.1, 1.5), p: float = 0.5,
                  generator=None) -> torch.Tensor:
    """Blurs each image with probability `p` and a random sigma (separable kernel, one group per image)."""
    batch, _, height, width = images.shape
    sigmas = _uniform(batch, *sigma, generator, images.device)
    apply = (torch.rand(batch, generator=generator) < p).to(images.device)
    radius = max(1, int(math.ceil(3 * sigma[1])))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-(offsets[None] ** 2) / (2 * sigmas[:, None] ** 2))
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    x = images.transpose(0, 1)  # (1, B, H, W): one group per image
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernels[:, None, None, :], groups=batch)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernels[:, None, :, None], groups=batch)
    return torch.where(apply[:, None, None, None], x.transpose(0, 1), images)


@dataclass
class GreyAugment:
    """The view augmentation of MoCo v2 / BYOL, adapted to grey MRI: crop, flip, intensity jitter, blur."""

    crop_scale: Tuple[float, float] = (0.4, 1.0)
    flip_p: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.3
    gamma: float = 0.2
    blur_p: float = 0.5
    blur_sigma: Tuple[float, float] = (0.1, 1.5)

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        images = random_resized_crop(images, self.crop_scale, generator=generator)
        images = random_flip(images, self.flip_p, generator=generator)
        images = intensity_jitter(images, self.brightness, self.contrast, self.gamma, generator=generator)
        images = gaussian_blur(images, self.blur_sigma, self.blur_p, generator=generator)
        return images.clamp(-1, 1)


@dataclass
class PretrainingAugment:
    """Optional augmentation of diffusion pretraining beside the dataset's flips: random resized crops covering at
    least `crop_scale` of the image, and brightness/contrast/gamma jitter (`intensity_jitter`)."""

    crop_scale: Optional[float] = None
    intensity_jitter: bool = False

    @property
    def enabled(self) -> bool:
        return self.crop_scale is not None or self.intensity_jitter

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.crop_scale is not None:
            images = random_resized_crop(images, (self.crop_scale, 1.0), generator=generator)
        if self.intensity_jitter:
            images = intensity_jitter(images, brightness=0.1, contrast=0.2, gamma=0.2, generator=generator)
        return images.clamp(-1, 1)
