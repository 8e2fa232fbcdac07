"""The one image preprocessing used everywhere: pretraining, feature extraction, the image processor.

An image (PIL, numpy or torch; grey, RGB, RGBA, palette, CMYK or 16-bit; any size) becomes one grey channel,
is resized to `resolution` x `resolution` keeping its aspect ratio, and is scaled to [-1, 1]:

1. `to_grayscale`: one 8-bit channel. Colour images go through PIL's ITU-R 601-2 luma transform; 16/32-bit and
   float images are min-max scaled per image to 0..255 (medical images rarely use the full 16-bit range).
2. `resize_image`: `resize_mode="pad"` (default) scales the longer side to `resolution` and pads the shorter
   one with black (the MRI background) so no anatomy is cut; `"center_crop"` scales the shorter side and
   crops the centre. Both use bicubic resampling with antialiasing. Square images give the same result.
3. `pixels_to_model_input`: uint8 0..255 -> float -1..1 (`x / 127.5 - 1`).

Steps 1-2 produce uint8 pixels: training decodes every file once into that form and caches it, so the
network sees exactly what `preprocess_images` gives for the same file.

Example:

```python
>>> import numpy as np
>>> from mic_diffrep.preprocessing import preprocess_images
>>> preprocess_images([np.zeros((30, 40, 3), dtype=np.uint8)], resolution=16).shape
torch.Size([1, 1, 16, 16])
```
"""

from typing import List, Sequence, Union

import numpy as np
import PIL.Image
import torch


RESIZE_MODES = ("pad", "center_crop")

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor]


def _array_to_pil(array: np.ndarray) -> PIL.Image.Image:
    """Numpy HW / HWC array (uint8, uint16, bool or float in [0, 1]) to a PIL image."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"Expected an image array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}."
        )
    if array.dtype == np.uint8:
        return PIL.Image.fromarray(array)
    if array.dtype == np.bool_:
        return PIL.Image.fromarray(array.astype(np.uint8) * 255)
    if np.issubdtype(array.dtype, np.integer):
        return PIL.Image.fromarray(_min_max_to_uint8(array.astype(np.float64)))
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("Image array contains NaN or inf values.")
        return PIL.Image.fromarray((np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8))
    raise ValueError(f"Unsupported image array dtype {array.dtype}.")


def _min_max_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3:
        array = array[..., :3].mean(axis=-1)
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return ((array - low) * (255.0 / (high - low))).round().astype(np.uint8)


def to_grayscale(image: ImageInput) -> PIL.Image.Image:
    """Returns `image` as an 8-bit single-channel ("L") PIL image.

    Tensors are `(C, H, W)` or `(H, W)`, numpy arrays `(H, W, C)` or `(H, W)`; float values are read as [0, 1].
    """
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim == 3:
            tensor = tensor.permute(1, 2, 0)
        image = tensor.float().numpy() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor.numpy()
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"Expected a PIL image, numpy array or torch tensor, got {type(image).__name__}.")
    if image.mode == "L":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return PIL.Image.fromarray(_min_max_to_uint8(np.asarray(image, dtype=np.float64)))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparent pixels onto black, the background of an MRI slice.
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = PIL.Image.alpha_composite(background, rgba)
    if image.mode != "RGB":  # CMYK, YCbCr, palette, ...: PIL converts these to L only through RGB
        image = image.convert("RGB")
    return image.convert("L")


def resize_image(image: PIL.Image.Image, resolution: int, resize_mode: str = "pad") -> PIL.Image.Image:
    """Resizes a grey image to a `resolution` x `resolution` square, keeping its aspect ratio."""
    check_resolution(resolution)
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}.")
    width, height = image.size
    if (width, height) == (resolution, resolution):
        return image
    if resize_mode == "pad":
        scale = resolution / max(width, height)
    else:
        scale = resolution / min(width, height)
    new_width = max(1, round(width * scale))
    new_height = max(1, round(height * scale))
    resized = image.resize((new_width, new_height), PIL.Image.Resampling.BICUBIC)
    if resize_mode == "center_crop":
        left = (new_width - resolution) // 2
        top = (new_height - resolution) // 2
        return resized.crop((left, top, left + resolution, top + resolution))
    canvas = PIL.Image.new("L", (resolution, resolution), 0)
    canvas.paste(resized, ((resolution - new_width) // 2, (resolution - new_height) // 2))
    return canvas


def check_resolution(resolution, name: str = "resolution", multiple_of: int = 1) -> None:
    """Raises a `ValueError` naming `name` unless `resolution` is a positive int divisible by `multiple_of`."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {resolution!r}.")
    if resolution % multiple_of != 0:
        raise ValueError(
            f"`{name}`={resolution} is not divisible by {multiple_of}, the UNet's total downsampling factor; "
            f"use e.g. {max(multiple_of, round(resolution / multiple_of) * multiple_of)}."
        )


def image_to_pixels(image: ImageInput, resolution: int, resize_mode: str = "pad") -> torch.Tensor:
    """Grey, resized uint8 pixels of shape `(1, resolution, resolution)`: what the decode cache stores."""
    grey = resize_image(to_grayscale(image), resolution, resize_mode)
    return torch.from_numpy(np.array(grey, dtype=np.uint8, copy=True)).unsqueeze(0)


def pixels_to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] to float model input in [-1, 1]."""
    return pixels.float() / 127.5 - 1.0


def preprocess_images(
    images: Union[ImageInput, Sequence[ImageInput]], resolution: int, resize_mode: str = "pad"
) -> torch.Tensor:
    """Preprocesses one image or a list of images into a float tensor `(N, 1, resolution, resolution)` in [-1, 1].

    A 4-D tensor or array is read as a batch (`(N, C, H, W)` for tensors, `(N, H, W, C)` for arrays).
    """
    if isinstance(images, (PIL.Image.Image,)) or (
        isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim <= 3
    ):
        images = [images]
    pixels: List[torch.Tensor] = [image_to_pixels(image, resolution, resize_mode) for image in images]
    if not pixels:
        raise ValueError("No images to preprocess.")
    return pixels_to_model_input(torch.stack(pixels))
