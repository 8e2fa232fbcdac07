"""Pipelines of mic-diffrep (installed as `mic_diffrep.pipelines`): the diffusers feature and sampling pipeline, and
the transformers pipeline of the `"medical-image-classification"` task."""

from .pipeline_diffusion_features import (
    DiffusionFeaturePipeline,
    DiffusionFeaturesOutput,
    save_image_grid,
)
from .pipeline_medical_image_classification import MedicalImageClassificationPipeline
from mic_diffrep.models.mic_diffrep.unet_features import block_names, pool_features

__all__ = ["DiffusionFeaturePipeline", "DiffusionFeaturesOutput", "MedicalImageClassificationPipeline", "block_names",
           "pool_features", "save_image_grid"]
