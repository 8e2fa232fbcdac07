"""Image processor for MicDiffRep: the exact preprocessing of pretraining, as a transformers image processor."""

import contextlib
from typing import List, Optional

import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from .preprocessing import (INTENSITY_WINDOWS, RESIZE_MODES, ImagePreprocessing, as_image_list, check_choice,
                            check_resolution, image_to_pixels, image_window, pixels_to_model_input, to_grayscale, window_intensities)


def _grey_value(value, name: str) -> float:
    """`image_mean` / `image_std` of the one grey channel: a number, or a list of one (transformers' list form)."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number, or a list of one (the model takes one grey channel), got "
                         f"{value!r}.")
    return float(value)


class MicDiffRepImageProcessorKwargs(ImagesKwargs, total=False):
    """The processor's own options, beside transformers' `ImagesKwargs` (`do_resize`, `do_rescale`, ...).

    resolution (`int`): output size (square). resize_mode (`str`): `"pad"` or `"center_crop"`.
    intensity_window (`str`): `"percentile"` or `"none"` (see `mic_diffrep.models.mic_diffrep.preprocessing`).
    slice_axis (`int`), slice_range (`[start, stop]` or `None`), keep_empty_slices (`bool`): which slices of a NIfTI
    volume are images (as the command line's `--slice_axis`, `--slice_range`, `--keep_empty_slices`).
    """

    resolution: int
    resize_mode: str
    intensity_window: str
    slice_axis: int
    slice_range: Optional[List[int]]
    keep_empty_slices: bool


def _size_as_resolution(options: dict) -> dict:
    """`options` with transformers' `size` (`{"height": r, "width": r}`, `{"shortest_edge": r}` or `r`) given as the
    processor's `resolution` (its images are square); `size` wins over a `resolution` beside it."""
    size = options.pop("size", None)
    if size is None:
        return options
    sides = set(size.values()) if isinstance(size, dict) and set(size) in ({"height", "width"}, {"shortest_edge"}) \
        else {size} if isinstance(size, int) and not isinstance(size, bool) else None
    if sides is None or len(sides) != 1:
        raise ValueError(f"`size` must be square ({{'height': r, 'width': r}}, {{'shortest_edge': r}} or r): this "
                         f"processor makes r x r images (its `resolution`); got {size!r}.")
    return {**options, "resolution": sides.pop()}  # wins: `from_pretrained(..., size=)` overrides a saved resolution


class MicDiffRepBatchFeature(BatchFeature):
    """The processor's output: `to()` moves `pixel_values` between devices but keeps them float32. The model noises
    pixels in float32 whatever its UNet runs in, and `transformers.pipeline` casts inputs to `model.dtype` (bf16 for a
    bf16 UNet), which would round the 8-bit intensities before the noising: its scores would then differ slightly
    from the model's own on the same image."""

    def to(self, *args, **kwargs) -> "MicDiffRepBatchFeature":
        args = tuple(arg for arg in args if not isinstance(arg, torch.dtype))
        kwargs.pop("dtype", None)
        return super().to(*args, **kwargs) if args or kwargs else self


class MicDiffRepImageProcessor(BaseImageProcessor):
    r"""
    Turns images (PIL, numpy or torch; grey or colour; any size) into `pixel_values` of shape `(N, 1, R, R)` in
    [-1, 1]: one grey channel, the intensity window, resized keeping the aspect ratio (`"pad"` or
    `"center_crop"`), rescaled by `1/255` and normalised with mean 0.5 and std 0.5. It calls the same functions as
    pretraining and feature extraction (`mic_diffrep.models.mic_diffrep.preprocessing`).

    File paths are accepted too, including DICOM (`.dcm`, `.dicom`) and NIfTI (`.nii`, `.nii.gz`) files, which give
    one row of `pixel_values` per slice (every non-empty axial slice of a volume, every frame of a multi-frame
    DICOM), windowed with the file's own display window when it has one; this needs `pip install mic-diffrep
    pydicom nibabel`.

    Args:
        resolution (`int`, *optional*, defaults to 112): output size.
        resize_mode (`str`, *optional*, defaults to `"pad"`): `"pad"` or `"center_crop"`.
        intensity_window (`str`, *optional*, defaults to `"percentile"`): `"percentile"` or `"none"`.
        do_resize (`bool`, *optional*, defaults to `True`): resize to `resolution`; with `False`, images must be
            `resolution` x `resolution` already.
        do_rescale (`bool`, *optional*, defaults to `True`), rescale_factor (`float`, defaults to `1/255`): scale
            0..255 to 0..1.
        do_normalize (`bool`, *optional*, defaults to `True`), image_mean / image_std (defaults to 0.5): then
            `(x - mean) / std`, giving [-1, 1].
        slice_axis (`int`, *optional*, defaults to 2), slice_range (`[start, stop]`, *optional*), keep_empty_slices
            (`bool`, *optional*, defaults to `False`): the slices of a NIfTI volume that are images; a model folder
            records those its probe was trained on, so `predict`, `evaluate` and pipelines read volumes alike.

    Every option can be overridden per call: `processor(images, resolution=64, return_tensors="pt")`. transformers'
    `size` (`{"height": r, "width": r}`, `{"shortest_edge": r}`) is read as `resolution`, and the `size` property gives
    it back in that form.

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
    valid_kwargs = MicDiffRepImageProcessorKwargs

    resolution = 112
    resize_mode = "pad"
    intensity_window = "percentile"
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = 0.5
    image_std = 0.5
    slice_axis = 2
    slice_range = None
    keep_empty_slices = False

    OPTIONS = ("resolution", "resize_mode", "intensity_window", "do_resize", "do_rescale", "rescale_factor",
               "do_normalize", "image_mean", "image_std", "slice_axis", "slice_range", "keep_empty_slices")
    SLICE_OPTIONS = ("slice_axis", "slice_range", "keep_empty_slices")

    def __init__(self, **kwargs):
        options = {key: kwargs.pop(key) for key in list(kwargs) if key in self.valid_kwargs.__annotations__}
        options = _size_as_resolution(options)
        super().__init__(**kwargs)
        # Every option is an instance attribute, so `to_dict` / `preprocessor_config.json` list them all.
        for key in self.OPTIONS:
            setattr(self, key, options[key] if options.get(key) is not None else getattr(type(self), key))
        self._check(self.to_options())

    @property
    def size(self) -> dict:
        """`{"height": resolution, "width": resolution}`, where transformers' training scripts look for the input
        size (read-only: set `resolution`)."""
        return {"height": self.resolution, "width": self.resolution}

    @property
    def preprocessing(self) -> ImagePreprocessing:
        """The processor's preprocessing settings (what decoding for this model must use)."""
        return ImagePreprocessing(self.resolution, self.resize_mode, self.intensity_window)

    def to_options(self, **overrides) -> dict:
        """The processor's options, with per-call `overrides` (`None` means: keep the processor's own; the slice
        options as `slice_settings_for` combines them)."""
        options = {name: overrides[name] if overrides.get(name) is not None else getattr(self, name)
                   for name in self.OPTIONS}
        options.update(self.slice_settings_for(**{name: overrides.get(name) for name in self.SLICE_OPTIONS}))
        return options

    @staticmethod
    def _check(options: dict) -> None:
        _grey_value(options["image_mean"], "image_mean")
        _grey_value(options["image_std"], "image_std")
        check_choice(options["resize_mode"], RESIZE_MODES, "resize_mode")
        check_choice(options["intensity_window"], INTENSITY_WINDOWS, "intensity_window")
        check_resolution(options["resolution"])
        if options["slice_axis"] not in (0, 1, 2) or isinstance(options["slice_axis"], bool):
            raise ValueError(f"`slice_axis` must be 0, 1 or 2 (RAS+ axes), got {options['slice_axis']!r}.")
        slice_range = options["slice_range"]
        if slice_range is not None and (len(slice_range) != 2 or not all(
                v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in slice_range)):
            raise ValueError(f"`slice_range` must be [start, stop] (integers or None), got {slice_range!r}.")

    @property
    def slice_settings(self) -> dict:
        """The slices of NIfTI volumes that are images: `{"slice_axis", "slice_range", "keep_empty_slices"}` (the
        keywords of `mic_diffrep.data.medical.slice_selection`)."""
        return {name: getattr(self, name) for name in self.SLICE_OPTIONS}

    def slice_settings_for(self, slice_axis: Optional[int] = None, slice_range=None,
                           keep_empty_slices: Optional[bool] = None) -> dict:
        """`slice_settings` with one call's changes (`None`: keep the processor's own). Another `slice_axis` drops the
        processor's `slice_range`, which counts slices along its own axis, unless a range is given too;
        `slice_range=(None, None)` reads every slice."""
        given = {name: value for name, value in (("slice_axis", slice_axis), ("slice_range", slice_range),
                                                 ("keep_empty_slices", keep_empty_slices)) if value is not None}
        settings = {**self.slice_settings, **given}
        if settings["slice_axis"] != self.slice_axis and "slice_range" not in given:
            settings["slice_range"] = None
        return settings

    def _to_pixels(self, image, options: dict) -> torch.Tensor:
        if options["do_resize"]:
            return image_to_pixels(image, options["resolution"], options["resize_mode"], options["intensity_window"])
        grey = window_intensities(to_grayscale(image), options["intensity_window"], window=image_window(image))
        if grey.shape != (options["resolution"],) * 2:
            raise ValueError(f"do_resize=False needs {options['resolution']}x{options['resolution']} images, got "
                             f"{grey.shape[1]}x{grey.shape[0]}.")
        return torch.from_numpy(grey.copy()).unsqueeze(0)

    def preprocess(self, images, return_tensors: Optional[str] = "pt", **kwargs) -> BatchFeature:
        """Preprocesses one image or a list; any option of the processor can be overridden for this call.

        A DICOM or NIfTI file gives one row per slice, so `pixel_values` may have more rows than there are inputs.
        """
        kwargs = _size_as_resolution(kwargs)
        unknown = sorted(k for k, v in kwargs.items() if k not in self.OPTIONS and v is not None)
        if unknown:
            raise TypeError(f"Unexpected keyword argument(s) {unknown} for MicDiffRepImageProcessor; its options are "
                            f"{', '.join(self.OPTIONS)}, or `size` (the resolution).")
        options = self.to_options(**kwargs)
        self._check(options)
        slices = {name: options[name] for name in self.SLICE_OPTIONS}
        pixels = [self._to_pixels(image, options) for image in as_image_list(images, slices)]
        if not pixels:
            raise ValueError("No images to preprocess.")
        pixel_values = pixels_to_model_input(
            torch.stack(pixels), options["rescale_factor"] if options["do_rescale"] else None,
            (_grey_value(options["image_mean"], "image_mean"), _grey_value(options["image_std"], "image_std"))
            if options["do_normalize"] else None)
        if return_tensors in ("np", "numpy"):
            return BatchFeature({"pixel_values": pixel_values.numpy()}, tensor_type="np")
        if return_tensors not in (None, "pt", "torch"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}.")
        return MicDiffRepBatchFeature({"pixel_values": pixel_values}, tensor_type="pt" if return_tensors else None)

    def __call__(self, images=None, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    @contextlib.contextmanager
    def _with_auto_map(self):
        """Within it, `save_pretrained` writes the processor's `auto_map` and copies its code file, so an uploaded
        folder loads with `AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)` where mic-diffrep is not
        installed. Outside it a local folder gets neither: there they make `transformers.pipeline` look for remote
        video-processor code and prompt for `trust_remote_code`."""
        cls, before, auto_map = type(self), type(self)._auto_class, self.__dict__.get("auto_map")
        cls._auto_class = "AutoImageProcessor"
        try:
            yield self
        finally:
            cls._auto_class = before
            if auto_map is None:  # transformers keeps the `auto_map` it wrote on the object: a later local save had it
                self.__dict__.pop("auto_map", None)

    def push_to_hub(self, *args, **kwargs):
        """`ImageProcessingMixin.push_to_hub`, with the processor's code (`_with_auto_map`), as
        `MicDiffRepForImageClassification.push_to_hub` uploads the model's."""
        with self._with_auto_map():
            return super().push_to_hub(*args, **kwargs)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """`ImageProcessingMixin.save_pretrained`; with `push_to_hub=True` the upload has the processor's code."""
        if not push_to_hub:
            return super().save_pretrained(save_directory, **kwargs)
        with self._with_auto_map():
            return super().save_pretrained(save_directory, push_to_hub=True, **kwargs)
