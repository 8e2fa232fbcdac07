"""MoCo v2 (Chen et al. 2020) for grey MRI slices."""

import torch
import torch.nn.functional as F
from torch import nn

from ...data.augmentations import GreyAugment
from .configuration import BaselineConfig
from .resnet import SmallResNet, frozen_copy, mlp, momentum_update


class MoCoV2(nn.Module):
    """MoCo v2 (Chen et al. 2020): query encoder + MLP head, momentum key encoder, a queue of negatives, InfoNCE."""

    def __init__(self, config: BaselineConfig):
        super().__init__()
        self.config = config
        self.encoder = SmallResNet(config.encoder_widths)
        self.head = mlp(self.encoder.output_dim, config.hidden_dim, config.projection_dim)
        self.key_encoder, self.key_head = frozen_copy(self.encoder), frozen_copy(self.head)
        self.register_buffer("queue", F.normalize(torch.randn(config.queue_size, config.projection_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.augment = GreyAugment()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replaces the oldest keys of the queue with `keys` (wrapping around)."""
        size, ptr = self.queue.shape[0], int(self.queue_ptr)
        index = (torch.arange(len(keys), device=keys.device) + ptr) % size
        self.queue[index] = keys.detach().to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + len(keys)) % size)

    def forward(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        view_q, view_k = self.augment(images, generator), self.augment(images, generator)
        q = F.normalize(self.head(self.encoder(view_q)), dim=1)
        with torch.no_grad():
            k = F.normalize(self.key_head(self.key_encoder(view_k)), dim=1)
        positives = (q * k).sum(dim=1, keepdim=True)
        negatives = q @ self.queue.clone().detach().to(q.dtype).T
        logits = torch.cat([positives, negatives], dim=1) / self.config.temperature
        loss = F.cross_entropy(logits.float(), torch.zeros(len(q), dtype=torch.long, device=q.device))
        self.enqueue(k)
        return loss

    def after_optimizer_step(self, progress: float) -> None:
        momentum_update(self.key_encoder, self.encoder, self.config.momentum)
        momentum_update(self.key_head, self.head, self.config.momentum)
