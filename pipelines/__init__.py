"""Diffusers pipelines of mic-diffrep (installed as `mic_diffrep.pipelines`)."""

from .pipeline_diffusion_features import (
    DiffusionFeaturePipeline,
    DiffusionFeaturesOutput,
    block_names,
    pool_features,
    save_image_grid,
)

__all__ = ["DiffusionFeaturePipeline", "DiffusionFeaturesOutput", "block_names", "pool_features", "save_image_grid"]
