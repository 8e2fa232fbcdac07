"""Diffusers pipelines of mic-diffrep (installed as `mic_diffrep.pipelines`)."""

from .pipeline_diffusion_features import (
    DiffusionFeaturePipeline,
    DiffusionFeaturesOutput,
    save_image_grid,
)
from mic_diffrep.models.mic_diffrep.unet_features import block_names, pool_features

__all__ = ["DiffusionFeaturePipeline", "DiffusionFeaturesOutput", "block_names", "pool_features", "save_image_grid"]
