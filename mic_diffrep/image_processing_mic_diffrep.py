"""Image processor for MicDiffRep: the exact preprocessing of pretraining, as a transformers image processor."""

from typing import Optional

from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .preprocessing import RESIZE_MODES, preprocess_images


class MicDiffRepImageProcessor(BaseImageProcessor):
    r"""
    Turns images (PIL, numpy or torch; grey or colour; any size) into `pixel_values` of shape `(N, 1, R, R)` in
    [-1, 1]: one grey channel, resized keeping the aspect ratio (`"pad"` or `"center_crop"`), `x / 127.5 - 1`.
    It calls the same function as pretraining and feature extraction (`mic_diffrep.preprocessing`).

    Args:
        resolution (`int`, *optional*, defaults to 112): output size.
        resize_mode (`str`, *optional*, defaults to `"pad"`): `"pad"` or `"center_crop"`.

    Example:

    ```python
    >>> import PIL.Image
    >>> from mic_diffrep import MicDiffRepImageProcessor
    >>> processor = MicDiffRepImageProcessor(resolution=64)
    >>> processor(PIL.Image.new("RGB", (100, 80)), return_tensors="pt")["pixel_values"].shape
    torch.Size([1, 1, 64, 64])
    ```
    """

    model_input_names = ["pixel_values"]

    def __init__(self, resolution: int = 112, resize_mode: str = "pad", **kwargs):
        super().__init__(**kwargs)
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}.")
        self.resolution = resolution
        self.resize_mode = resize_mode

    def preprocess(self, images, resolution: Optional[int] = None, resize_mode: Optional[str] = None,
                   return_tensors: Optional[str] = "pt", **kwargs) -> BatchFeature:
        """Preprocesses one image or a list; `resolution` and `resize_mode` override the processor's for this call."""
        pixel_values = preprocess_images(images, resolution or self.resolution, resize_mode or self.resize_mode)
        if return_tensors in ("np", "numpy"):
            return BatchFeature({"pixel_values": pixel_values.numpy()}, tensor_type="np")
        if return_tensors not in (None, "pt", "torch"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}.")
        return BatchFeature({"pixel_values": pixel_values}, tensor_type="pt" if return_tensors else None)

    def __call__(self, images=None, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)
