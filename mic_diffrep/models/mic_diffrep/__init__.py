"""MicDiffRep as a transformers model: configuration, model, image processor, and what they need.

This folder is self-contained (its modules import each other only), because `save_pretrained` / `push_to_hub`
copy exactly these files next to the weights, so a Hub repository loads with `trust_remote_code=True` where
mic-diffrep is not installed. It therefore also holds the one image preprocessing (`preprocessing.py`), the noise and
the hooked UNet forward (`unet_features.py`) and the UNet presets (`unet.py`), which the rest of the package imports
from here.
"""

from .configuration_mic_diffrep import MicDiffRepConfig
from .image_processing_mic_diffrep import MicDiffRepImageProcessor
from .modeling_mic_diffrep import MicDiffRepForImageClassification, MicDiffRepMSFAHead, MicDiffRepPreTrainedModel


__all__ = ["MicDiffRepConfig", "MicDiffRepForImageClassification", "MicDiffRepImageProcessor", "MicDiffRepMSFAHead",
           "MicDiffRepPreTrainedModel"]
