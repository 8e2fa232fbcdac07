"""MAE (He et al. 2022) for grey MRI slices, through transformers' `ViTMAEForPreTraining`."""

import torch
from torch import nn
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from .configuration import BaselineConfig


class MAE(nn.Module):
    """MAE (He et al. 2022) through transformers' `ViTMAEForPreTraining`, small enough for 64-112 px grey images."""

    def __init__(self, config: BaselineConfig):
        super().__init__()
        self.config = config
        heads = max(1, config.mae_hidden_size // 64)
        self.mae = ViTMAEForPreTraining(ViTMAEConfig(
            image_size=config.resolution, patch_size=config.mae_patch_size, num_channels=1,
            hidden_size=config.mae_hidden_size, num_hidden_layers=config.mae_num_layers, num_attention_heads=heads,
            intermediate_size=4 * config.mae_hidden_size, decoder_hidden_size=128, decoder_num_hidden_layers=2,
            decoder_num_attention_heads=4, decoder_intermediate_size=512, mask_ratio=config.mae_mask_ratio,
            norm_pix_loss=True))

    def forward(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        noise = None
        if generator is not None:
            num_patches = (self.config.resolution // self.config.mae_patch_size) ** 2
            noise = torch.rand(len(images), num_patches, generator=generator).to(images.device)
        return self.mae(pixel_values=images, noise=noise).loss

    def after_optimizer_step(self, progress: float) -> None:
        pass
