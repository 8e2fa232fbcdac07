"""mic-diffrep: denoising diffusion models as self-supervised feature extractors for medical image classification.

```python
>>> from mic_diffrep import DiffusionFeaturePipeline
>>> pipe = DiffusionFeaturePipeline.from_pretrained("runs/pretrain")  # doctest: +SKIP
>>> out = pipe.extract_features(images, timesteps=[10, 100])  # doctest: +SKIP
```
"""

__version__ = "0.1.0"

from .data import DecodedImages, decode_images, load_image_folder
from .pipelines import DiffusionFeaturePipeline, DiffusionFeaturesOutput, save_image_grid
from .preprocessing import preprocess_images
from .unet import create_scheduler, create_unet

__all__ = [
    "DecodedImages",
    "DiffusionFeaturePipeline",
    "DiffusionFeaturesOutput",
    "create_scheduler",
    "create_unet",
    "decode_images",
    "load_image_folder",
    "preprocess_images",
    "save_image_grid",
]
