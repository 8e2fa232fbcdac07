"""mic-diffrep: denoising diffusion models as self-supervised feature extractors for medical image classification.

```python
>>> from mic_diffrep import DiffusionFeaturePipeline
>>> pipe = DiffusionFeaturePipeline.from_pretrained("runs/pretrain")  # doctest: +SKIP
>>> out = pipe.extract_features(images, timesteps=[10, 100])  # doctest: +SKIP
```
"""

__version__ = "0.1.0"

from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

from .configuration_mic_diffrep import MicDiffRepConfig
from .data import DecodedImages, decode_images, load_image_folder
from .image_processing_mic_diffrep import MicDiffRepImageProcessor
from .modeling_mic_diffrep import MicDiffRepForImageClassification, MicDiffRepPreTrainedModel
from .pipelines import DiffusionFeaturePipeline, DiffusionFeaturesOutput, save_image_grid
from .preprocessing import preprocess_images
from .unet import create_scheduler, create_unet


AutoConfig.register(MicDiffRepConfig.model_type, MicDiffRepConfig, exist_ok=True)
AutoModelForImageClassification.register(MicDiffRepConfig, MicDiffRepForImageClassification, exist_ok=True)
AutoImageProcessor.register(MicDiffRepConfig, image_processor_classes={"pil": MicDiffRepImageProcessor}, exist_ok=True)
# `save_pretrained` / `push_to_hub` then write `auto_map` and copy the code files, so a Hub repo loads with
# `trust_remote_code=True` where mic-diffrep is not installed. The image processor gets its `auto_map` only in
# `mic_diffrep.hub.push_to_hub`: in a local folder it makes `transformers.pipeline` look for remote video
# processor code and prompt for trust_remote_code.
MicDiffRepConfig.register_for_auto_class()
MicDiffRepForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "DecodedImages",
    "DiffusionFeaturePipeline",
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
