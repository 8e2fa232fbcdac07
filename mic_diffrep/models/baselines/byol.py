"""BYOL (Grill et al. 2020) for grey MRI slices."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...data.augmentations import GreyAugment
from .configuration import BaselineConfig
from .resnet import SmallResNet, frozen_copy, mlp, momentum_update


class BYOL(nn.Module):
    """BYOL (Grill et al. 2020): online encoder + projector + predictor, an EMA target network, cosine loss."""

    def __init__(self, config: BaselineConfig):
        super().__init__()
        self.config = config
        self.encoder = SmallResNet(config.encoder_widths)
        self.projector = mlp(self.encoder.output_dim, config.hidden_dim, config.projection_dim)
        self.predictor = mlp(config.projection_dim, config.hidden_dim, config.projection_dim)
        self.target_encoder, self.target_projector = frozen_copy(self.encoder), frozen_copy(self.projector)
        self.augment = GreyAugment()

    def forward(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        view_1, view_2 = self.augment(images, generator), self.augment(images, generator)
        online = [self.predictor(self.projector(self.encoder(v))) for v in (view_1, view_2)]
        with torch.no_grad():
            target = [self.target_projector(self.target_encoder(v)) for v in (view_2, view_1)]
        losses = [2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=1) for p, z in zip(online, target)]
        return (losses[0] + losses[1]).mean()

    def after_optimizer_step(self, progress: float) -> None:
        """EMA of the target with BYOL's cosine schedule from `momentum` to 1 over training (`progress` in [0, 1])."""
        tau = 1 - (1 - self.config.momentum) * (math.cos(math.pi * min(progress, 1.0)) + 1) / 2
        momentum_update(self.target_encoder, self.encoder, tau)
        momentum_update(self.target_projector, self.projector, tau)
