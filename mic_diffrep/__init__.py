"""mic-diffrep: denoising diffusion models as self-supervised feature extractors for medical image classification.

```python
>>> from mic_diffrep import DiffusionFeaturePipeline
>>> pipe = DiffusionFeaturePipeline.from_pretrained("runs/pretrain")  # doctest: +SKIP
>>> out = pipe.extract_features(["slice.jpg"], timesteps=[10, 100])  # doctest: +SKIP

```

Layout: `data/` (folders, decoding, augmentations), `models/` (the MicDiffRep transformers model with its
preprocessing and hooked UNet forward; the baselines), `features/` (extractors, cache, sharded extraction),
`probing/` (heads, selection, export), `leakage/`, `training/` (the loop, diffusion and baseline pretraining),
`reporting/` (metrics, plots, model cards, Hub), `commands/` (the `mic-diffrep` command line).
"""

__version__ = "0.1.0"

import importlib.util
import os
import sys

import diffusers
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification
from transformers.pipelines import PIPELINE_REGISTRY


def _import_checkout_pipelines() -> None:
    """`pipelines/` is installed as `mic_diffrep.pipelines` (setup.cfg's `package_dir`); a source checkout on the
    import path but not installed (`PYTHONPATH=.`, a notebook in the repository) imports it from beside the package."""
    if importlib.util.find_spec(f"{__name__}.pipelines") is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipelines")
    if os.path.isfile(os.path.join(folder, "__init__.py")):
        spec = importlib.util.spec_from_file_location(f"{__name__}.pipelines", os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[spec.name]
            raise
        setattr(sys.modules[__name__], "pipelines", module)  # as an import of the subpackage sets it


_import_checkout_pipelines()

from .data import DecodedImages, ImagePreprocessing, decode_images, load_image_folder, preprocess_images
from .models.mic_diffrep import (MicDiffRepConfig, MicDiffRepForImageClassification, MicDiffRepImageProcessor,
                                 MicDiffRepPreTrainedModel)
from .models.mic_diffrep.unet import create_scheduler, create_unet
from .pipelines import (DiffusionFeaturePipeline, DiffusionFeaturesOutput, MedicalImageClassificationPipeline,
                        save_image_grid)
from .pipelines.pipeline_medical_image_classification import NoDefaultModel


AutoConfig.register(MicDiffRepConfig.model_type, MicDiffRepConfig, exist_ok=True)
AutoModelForImageClassification.register(MicDiffRepConfig, MicDiffRepForImageClassification, exist_ok=True)
AutoImageProcessor.register(MicDiffRepConfig, image_processor_classes={"pil": MicDiffRepImageProcessor}, exist_ok=True)
# `save_pretrained` / `push_to_hub` then write `auto_map` and copy the code files, so a Hub repo loads with
# `trust_remote_code=True` where mic-diffrep is not installed. The image processor gets its `auto_map` only when it
# is uploaded (its `push_to_hub`, `mic_diffrep.reporting.push_to_hub`): in a local folder it makes
# `transformers.pipeline` look for remote video processor code and prompt for trust_remote_code.
MicDiffRepConfig.register_for_auto_class()
# `pipeline("medical-image-classification", model=...)`: images reach the image processor unconverted (16-bit, float,
# DICOM, NIfTI), where transformers' "image-classification" pipeline first makes them 8-bit RGB.
PIPELINE_REGISTRY.register_pipeline("medical-image-classification", pipeline_class=MedicalImageClassificationPipeline,
                                    pt_model=AutoModelForImageClassification, type="image")
PIPELINE_REGISTRY.supported_tasks["medical-image-classification"]["default"] = NoDefaultModel()
MicDiffRepForImageClassification.register_for_auto_class("AutoModelForImageClassification")
# `DiffusionPipeline.from_pretrained(folder_or_repo)` looks the class named in `model_index.json` up in the diffusers
# module (diffusers has no registry like `AutoConfig.register`): after `import mic_diffrep` it finds this one.
diffusers.DiffusionFeaturePipeline = DiffusionFeaturePipeline

__all__ = [
    "DecodedImages",
    "DiffusionFeaturePipeline",
    "ImagePreprocessing",
    "MedicalImageClassificationPipeline",
    "MicDiffRepConfig",
    "MicDiffRepForImageClassification",
    "MicDiffRepImageProcessor",
    "MicDiffRepPreTrainedModel",
    "DiffusionFeaturesOutput",
    "create_scheduler",
    "create_unet",
    "decode_images",
    "load_image_folder",
    "preprocess_images",
    "save_image_grid",
]
