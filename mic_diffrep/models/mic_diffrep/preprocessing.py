"""The one image preprocessing used everywhere: pretraining, feature extraction, the image processor.

An image (PIL, numpy or torch; grey, RGB, RGBA, palette, CMYK, 16-bit or float; any size) becomes one grey channel,
is windowed to 8 bits, resized to `resolution` x `resolution` keeping its aspect ratio, and scaled to [-1, 1]:

1. `to_grayscale`: one grey channel at the image's own bit depth. Colour images go through PIL's ITU-R 601-2 luma
   transform; float images are read as [0, 1].
2. `window_intensities`, the intensity rule (`intensity_window`), the same for every input so that training and
   inference agree:
   - `"percentile"` (default): the image's 0.5th..99.5th intensity percentiles are mapped linearly to 0..255 and
     values outside are clipped. This is the usual MRI display window, and it is invariant to the bit depth and
     linear scaling of the file: an 8-bit slice and a 16-bit copy of it (values x 257) give the same pixels.
   - `"none"`: 8-bit images (JPEG, PNG) are kept as they are; deeper images, and DICOM / NIfTI slices (physical
     values, whatever their dtype on disk), are min-max scaled to 0..255.
   A constant image stays as it is (8-bit) or becomes black.
3. `resize_image`: `resize_mode="pad"` (default) scales the longer side to `resolution` and pads the shorter
   one with black (the MRI background) so no anatomy is cut; `"center_crop"` scales the shorter side and
   crops the centre. Both use bicubic resampling with antialiasing. Square images give the same result.
4. `pixels_to_model_input`: uint8 0..255 -> float -1..1 (`(x / 255 - 0.5) / 0.5`).

Steps 1-3 produce uint8 pixels: training decodes every file once into that form and caches it, so the
network sees exactly what `preprocess_images` gives for the same file.

DICOM and NIfTI files (`.dcm`, `.dicom`, `.nii`, `.nii.gz`) are read with `mic_diffrep.data.medical` (imported
when needed, so this module stays importable on its own as Hub remote code): `as_image_list` expands such a path
into its slices, one image each, and a slice (any object with `.pixels` and `.window`, like `MedicalSlice`) is
windowed with its file's display window when it has one, else by the intensity rule.

Example:

```python
>>> import numpy as np
>>> from mic_diffrep.data import preprocess_images
>>> preprocess_images([np.zeros((30, 40, 3), dtype=np.uint8)], resolution=16).shape
torch.Size([1, 1, 16, 16])

```
"""

import contextlib
import io
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch


RESIZE_MODES = ("pad", "center_crop")
INTENSITY_WINDOWS = ("percentile", "none")
WINDOW_PERCENTILES = (0.5, 99.5)

# Also accepted: a slice of a DICOM / NIfTI file, any object with `.pixels` (2-D) and `.window` (like `MedicalSlice`).
ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, str, os.PathLike]

_DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# As `mic_diffrep.data.medical.MEDICAL_EXTENSIONS` (repeated: this module must import without mic_diffrep.data).
# The most pixels one file gives (every frame of a DICOM file, slice of a NIfTI volume, page of a TIFF file, together):
# 2^29, about 4 GiB as the float64 the readers work in (a whole-body CT of 512 x 512 x 2048 slices). A small file
# whose header or compression claims more (a corrupt or hostile one) is refused before it is decoded.
MAX_VOXELS = 2**29
_MEDICAL_EXTENSIONS = (".dcm", ".dicom", ".ima", ".nii", ".nii.gz")
_MEDICAL_INSTALL_HINT = "reading DICOM/NIfTI needs `pip install mic-diffrep pydicom nibabel`"


def has_dicom_preamble(path) -> bool:
    """Whether `path` is a DICOM file named without an extension, as PACS exports name them (`IM0001`, or a UID
    such as `1.2.840.113619.2.55.3`): a 128-byte preamble, then `DICM`. Only such names are opened (`DICOMDIR`,
    an index without pixels, is not an image).
    """
    name = os.path.basename(os.fspath(path))
    suffix = os.path.splitext(name)[1]
    if (suffix and not suffix[1:].isdigit()) or name.upper() == "DICOMDIR" or not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_medical_path(image) -> bool:
    """Whether `image` is a file path (str or PathLike) to a DICOM or NIfTI file: by extension, or a DICOM file
    without one (`has_dicom_preamble`)."""
    return isinstance(image, (str, os.PathLike)) and (
        os.fspath(image).lower().endswith(_MEDICAL_EXTENSIONS) or has_dicom_preamble(image))


def is_medical_slice(image) -> bool:
    """Whether `image` is a slice of a DICOM / NIfTI file: an object with `.pixels` and `.window` (duck-typed, like
    `mic_diffrep.data.medical.MedicalSlice`)."""
    return hasattr(image, "pixels") and hasattr(image, "window") and not isinstance(
        image, (PIL.Image.Image, np.ndarray, torch.Tensor, str, os.PathLike))


def image_pages(image) -> Optional[List[PIL.Image.Image]]:
    """The pages of a multi-page TIFF file (a stack of slices, as microscopes and some scanners export them), each
    one image, as the frames of a multi-frame DICOM file are; `None` for any other file. `image`: a path, or the
    file opened with PIL (so that a caller reading it anyway opens it once). Only the first page was read before."""
    if isinstance(image, PIL.Image.Image):
        if image.format != "TIFF" or getattr(image, "n_frames", 1) < 2:
            return None
        total = 0
        for index in range(image.n_frames):  # the pages' sizes, from their headers, before any is decoded
            image.seek(index)
            total += image.size[0] * image.size[1]
        if total > MAX_VOXELS:
            raise ValueError(f"{getattr(image, 'filename', '') or 'A TIFF file'}: its {image.n_frames} pages hold "
                             f"{total:,} pixels, more than the {MAX_VOXELS:,} read from one file.")
        pages = []
        for index in range(image.n_frames):
            image.seek(index)
            pages.append(image.copy())
        return pages
    if not isinstance(image, (str, os.PathLike)) or not os.fspath(image).lower().endswith((".tif", ".tiff")):
        return None
    with PIL.Image.open(image) as opened:
        return image_pages(opened)


def read_medical_file(path, slices=None) -> list:
    """The slices of a DICOM or NIfTI file (`mic_diffrep.data.medical.read_medical_slices`), chosen by `slices`:
    a `SliceSelection`, the slice settings of an image processor (`{"slice_axis", "slice_range",
    "keep_empty_slices"}`), or `None` (every non-empty axial slice).

    Raises:
        `ImportError`: mic-diffrep's reader is not installed (this module runs as Hub remote code on its own).
    """
    try:
        from mic_diffrep.data.medical import SliceSelection, slice_selection
    except ImportError as error:
        raise ImportError(f"{os.fspath(path)}: {_MEDICAL_INSTALL_HINT}.") from error
    if isinstance(slices, dict):
        slices = slice_selection(**slices)
    elif slices is not None and not isinstance(slices, SliceSelection):
        raise TypeError(f"`slices` must be a `mic_diffrep.data.SliceSelection` (e.g. SliceSelection(slice_axis=2, "
                        f"slice_range=(40, 90))) or a dict of slice settings, got {slices!r}.")
    return (SliceSelection() if slices is None else slices).read(path)


def _one_image(image):
    """`image`, with a path to a one-slice DICOM / NIfTI file replaced by that slice (several slices: an error)."""
    if not is_medical_path(image):
        return image
    items = read_medical_file(image)
    if len(items) != 1:
        raise ValueError(f"{os.fspath(image)} holds {len(items)} slices; pass it through `as_image_list` or "
                         f"`preprocess_images`, which give one image per slice.")
    return items[0]


def _slice_grey(pixels) -> np.ndarray:
    """A slice's pixels as 2-D float64; NaN / inf (e.g. outside a NIfTI brain mask) become the lowest finite value."""
    grey = np.asarray(pixels, dtype=np.float64)
    if grey.ndim != 2:
        raise ValueError(f"Expected a 2-D slice, got pixels of shape {grey.shape}.")
    finite = np.isfinite(grey)
    if not finite.all():
        grey = np.where(finite, grey, grey[finite].min() if finite.any() else 0.0)
    return grey


def image_window(image) -> Optional[Tuple[float, float]]:
    """The display window `(low, high)` an image carries: a DICOM / NIfTI slice's own window, else `None`."""
    if is_medical_slice(image) and image.window is not None:
        low, high = image.window
        return (float(low), float(high))
    return None


def check_choice(value, choices, name: str) -> None:
    """Raises a `ValueError` naming `name` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


# ITU-R 601-2 luma, the weights of PIL's colour-to-"L" conversion: colour arrays at any depth are read the same way.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


def _grey_from_array(array: np.ndarray) -> np.ndarray:
    """Numpy HW / HWC array to a 2-D grey array: uint8 for 8-bit data, float64 at full depth otherwise."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        hint = ""
        if array.ndim == 3:  # (N, H, W) or (C, H, W): which one cannot be told apart for 3 or 4 rows, so neither is read
            hint = "; a batch of grey images is (N, H, W, 1) (`array[..., None]`) or a list"
            if array.shape[0] in (3, 4):
                hint += ", and a channels-first colour image is read as `array.transpose(1, 2, 0)`"
        raise ValueError(
            f"Expected an image array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}{hint}."
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if array.dtype == np.uint8:  # colour as a PIL image of its pixels is read: luma, alpha composited onto black
        return to_grayscale(PIL.Image.fromarray(array)) if array.ndim == 3 else array
    opaque = None
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("Image array contains NaN or inf values.")
        array = array.astype(np.float64)
        if array.min() >= 0.0 and array.max() <= 1.0:  # [0, 1] images as 0..255; other ranges (raw MRI intensities,
            array, opaque = array * 255.0, 255.0  # CT in HU, 0..255 floats) stay: the window maps them, nothing clips
    elif np.issubdtype(array.dtype, np.integer):
        opaque = float(np.iinfo(array.dtype).max)
    else:
        raise ValueError(f"Unsupported image array dtype {array.dtype}.")
    if array.ndim == 3 and array.min() < 0:  # no colour image is negative: a few slices of a volume (CT in HU, say)
        raise ValueError(f"An array of shape {array.shape} with negative values is not a colour (H, W, C) image: pass "
                         f"a volume's slices one at a time (`volume[..., k]`), or its DICOM / NIfTI file.")
    array = array.astype(np.float64)
    if array.ndim == 2:
        return array
    grey = array[..., :3] @ LUMA_WEIGHTS  # as PIL's "L" of 8-bit colour
    if array.shape[-1] == 4:  # transparent pixels onto black, as for a PIL image
        alpha = array[..., 3]
        grey = grey * (alpha / (opaque or max(float(alpha.max()), 1e-12)))
    return grey


def to_grayscale(image: ImageInput) -> np.ndarray:
    """`image` as a 2-D grey numpy array at its own depth: uint8 for 8-bit and colour images, float64 for 16-bit,
    32-bit and float ones (floats in [0, 1] scaled to 0..255; floats in any other range, such as raw MRI
    intensities or CT Hounsfield units, kept as they are for the intensity window, like 16-bit data).

    Tensors are `(C, H, W)` or `(H, W)`, numpy arrays `(H, W, C)` or `(H, W)`; file paths are opened with PIL. A
    DICOM / NIfTI slice (`.pixels`, `.window`) gives its float64 pixels in physical units (its window is applied by
    `window_intensities`, see `image_window`); a path to a one-slice DICOM / NIfTI file gives that slice.
    """
    image = _one_image(image)
    if is_medical_slice(image):
        return _slice_grey(image.pixels)
    if isinstance(image, (str, os.PathLike)):
        with PIL.Image.open(image) as opened:
            opened.load()
            return to_grayscale(opened)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim not in (2, 3) or (tensor.ndim == 3 and tensor.shape[0] not in (1, 3, 4)):
            raise ValueError(f"Expected an image tensor of shape (H, W) or (C, H, W) with C 1, 3 or 4, got "
                             f"{tuple(tensor.shape)}; a batch of grey slices is (N, 1, H, W).")
        if tensor.ndim == 3:
            tensor = tensor.permute(1, 2, 0)
        image = tensor.float().numpy() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor.numpy()
    if isinstance(image, np.ndarray):
        return _grey_from_array(image)
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"Expected a PIL image, numpy array, torch tensor or file path, got {type(image).__name__}.")
    if image.mode == "L":
        return np.asarray(image)
    if image.mode in _DEEP_MODES:
        return np.asarray(image, dtype=np.float64)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparent pixels onto black, the background of an MRI slice.
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = PIL.Image.alpha_composite(background, rgba)
    if image.mode != "RGB":  # CMYK, YCbCr, palette, ...: PIL converts these to L only through RGB
        image = image.convert("RGB")
    return np.asarray(image.convert("L"))


def window_intensities(grey: np.ndarray, intensity_window: str = "percentile",
                       window: Optional[Tuple[float, float]] = None) -> np.ndarray:
    """Maps a 2-D grey array to uint8 0..255 by the intensity rule `intensity_window` (see the module docstring).

    `window` (`(low, high)` intensities), when given, wins over the rule: a DICOM file's own window, say.
    """
    check_choice(intensity_window, INTENSITY_WINDOWS, "intensity_window")
    if window is None:
        if intensity_window == "none" and grey.dtype == np.uint8:
            return grey
        if intensity_window == "percentile":
            window = tuple(float(v) for v in np.percentile(grey, WINDOW_PERCENTILES))
        if window is None or window[1] <= window[0]:
            window = (float(grey.min()), float(grey.max()))
    low, high = window
    if high <= low:
        return grey.copy() if grey.dtype == np.uint8 else np.zeros(grey.shape, dtype=np.uint8)
    scaled = (np.asarray(grey, dtype=np.float64) - low) * (255.0 / (high - low))
    return np.clip(scaled, 0.0, 255.0).round().astype(np.uint8)


def resize_image(image: PIL.Image.Image, resolution: int, resize_mode: str = "pad") -> PIL.Image.Image:
    """Resizes a grey image to a `resolution` x `resolution` square, keeping its aspect ratio."""
    check_resolution(resolution)
    check_choice(resize_mode, RESIZE_MODES, "resize_mode")
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


# Above any clinical slice matrix (MRI up to 512, CT 512): a larger `resolution` is a typo, whose decoded images
# would not fit in memory (100000 px: 10 GB per image) long before anything says so.
MAX_RESOLUTION = 2048


def check_resolution(resolution, name: str = "resolution", multiple_of: int = 1) -> None:
    """Raises a `ValueError` naming `name` unless `resolution` is a positive int up to `MAX_RESOLUTION`, divisible by
    `multiple_of`."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {resolution!r}.")
    if resolution > MAX_RESOLUTION:
        raise ValueError(f"`{name}` {resolution} is above {MAX_RESOLUTION} px, larger than clinical slice matrices "
                         f"(the paper uses 112): its decoded images would not fit in memory.")
    if resolution % multiple_of != 0:
        raise ValueError(
            f"`{name}`={resolution} is not divisible by {multiple_of}, the UNet's total downsampling factor; "
            f"use e.g. {max(multiple_of, round(resolution / multiple_of) * multiple_of)}."
        )


def image_to_pixels(image: ImageInput, resolution: int, resize_mode: str = "pad",
                    intensity_window: str = "percentile") -> torch.Tensor:
    """Grey, windowed, resized uint8 pixels of shape `(1, resolution, resolution)`: what the decode cache stores.

    A DICOM / NIfTI slice with a display window of its own (`.window`) is windowed with it, any other image by the
    rule `intensity_window`.
    """
    image = _one_image(image)
    grey = to_grayscale(image)
    if not grey.size:
        raise ValueError(f"An image of size {grey.shape[1]} x {grey.shape[0]}: no pixels to read.")
    grey = PIL.Image.fromarray(window_intensities(grey, intensity_window, window=image_window(image)))
    resized = resize_image(grey, resolution, resize_mode)
    return torch.from_numpy(np.array(resized, dtype=np.uint8, copy=True)).unsqueeze(0)


@dataclass(frozen=True)
class ImagePreprocessing:
    """The preprocessing settings of a model: `ImagePreprocessing(64)(image)` gives uint8 `(1, 64, 64)` pixels.

    Pipelines (`pipe.preprocessing`), image processors and baselines carry one, and every decode path takes one, so
    training and inference cannot disagree.
    """

    resolution: int
    resize_mode: str = "pad"
    intensity_window: str = "percentile"

    def __post_init__(self):
        check_resolution(self.resolution)
        check_choice(self.resize_mode, RESIZE_MODES, "resize_mode")
        check_choice(self.intensity_window, INTENSITY_WINDOWS, "intensity_window")

    @classmethod
    def of(cls, preprocessing: Union["ImagePreprocessing", int]) -> "ImagePreprocessing":
        """`preprocessing` itself, or the default settings at that resolution when given an int."""
        return preprocessing if isinstance(preprocessing, cls) else cls(preprocessing)

    def __call__(self, image: ImageInput) -> torch.Tensor:
        return image_to_pixels(image, self.resolution, self.resize_mode, self.intensity_window)


def pixels_to_model_input(pixels: torch.Tensor, rescale_factor: Optional[float] = 1 / 255,
                          normalize: Optional[Tuple[float, float]] = (0.5, 0.5)) -> torch.Tensor:
    """uint8 pixels in [0, 255] to float model input in [-1, 1]: `(x * rescale_factor - mean) / std`, as
    transformers' image processors rescale and normalise (`None` skips a step)."""
    x = pixels.float()
    if rescale_factor is not None:
        x = x * rescale_factor
    if normalize is not None:
        x = (x - normalize[0]) / normalize[1]
    return x


def as_image_list(images, slices=None) -> list:
    """One image or a batch as a list of images; a 4-D tensor or array is a batch (`(N, C, H, W)` for tensors,
    `(N, H, W, C)` for arrays), and so is a `datasets.Dataset` with an `image` column (decoded or not). A path to a
    DICOM or NIfTI file becomes its slices, one image each, in order (`slices`: a
    `mic_diffrep.data.medical.SliceSelection`; `None`: every non-empty axial slice)."""
    return image_list_with_ids(images, slices)[0]


def slice_id(path: str, slice_index: Optional[int]) -> str:
    """The image id of a slice: `"<path>#slice=<k>"` for slice `k` of a multi-slice file, else `path`."""
    return path if slice_index is None else f"{path}#slice={slice_index}"


def _is_file_record(image) -> bool:
    """A `datasets` image that is not decoded: `{"path": ..., "bytes": ...}` (as `load_image_folder` gives)."""
    return isinstance(image, dict) and set(image) <= {"path", "bytes"} and bool(image.get("path") or image.get("bytes"))


def undecoded_images(dataset):
    """`dataset` (a `datasets.Dataset` with an `image` column) reading its files rather than decoded copies, so ids,
    DICOM / NIfTI files and 16-bit pixels stay intact: its `image` column cast to `Image(decode=False)` if need be."""
    if dataset.column_names is not None and "image" not in dataset.column_names:
        raise ValueError(f"A datasets.Dataset of images needs an `image` column, got {dataset.column_names}: "
                         f"`dataset.rename_column(name, 'image')`.")
    feature = (dataset.features or {}).get("image")  # an IterableDataset of unknown features has none
    return dataset.cast_column("image", type(feature)(decode=False)) if getattr(feature, "decode", False) else dataset


def record_source(record: dict) -> Union[str, bytes]:
    """Where to read a `datasets` image record from: its bytes when it has them, as `datasets.Image` decodes it (a
    Hub dataset's records hold the bytes and the original file name, which may name an unrelated local file), else
    its file (local folders). A DICOM / NIfTI file's bytes are read as that file (`medical_record_suffix`)."""
    return record["bytes"] if record.get("bytes") is not None else record.get("path")


def medical_record_suffix(data: bytes, name: Optional[str]) -> Optional[str]:
    """The extension under which a DICOM / NIfTI file held as bytes (a `datasets` record) is read: its file name's,
    or `.dcm` for bytes with a DICOM preamble; `None` for the images PIL reads from bytes.

    >>> medical_record_suffix(b"...", "sub-01_T1w.nii.gz"), medical_record_suffix(b"...", "slice.png")
    ('.nii.gz', None)
    """
    lowered = (name or "").lower()
    for extension in sorted(_MEDICAL_EXTENSIONS, key=len, reverse=True):
        if lowered.endswith(extension):
            return extension
    return ".dcm" if data[128:132] == b"DICM" else None


@contextlib.contextmanager
def medical_bytes_as_file(data: bytes, name: Optional[str], suffix: str):
    """A DICOM / NIfTI file held as bytes, written to a temporary file (the readers read files); removed afterwards.
    An error of reading it names the record (`name`), not the temporary file."""
    with tempfile.TemporaryDirectory(prefix="mic-diffrep-") as folder:
        base = re.sub(r"[^\w.-]", "_", os.path.basename(name or "")).strip("_") or "image"
        path = os.path.join(folder, base if base.lower().endswith(suffix) else base + suffix)
        with open(path, "wb") as f:
            f.write(data)
        try:
            yield path
        except Exception as error:  # noqa: BLE001 - re-raised as it was, naming the record
            try:
                named = type(error)(str(error).replace(path, name or "<bytes>"))
            except Exception:  # noqa: BLE001 - an exception type that takes other arguments: as it is
                raise error from None
            raise named from error


def dataset_image_records(dataset) -> list:
    """The `image` column of a `datasets.Dataset`, undecoded (`{"path", "bytes"}` records, see `record_source`)."""
    return undecoded_images(dataset)["image"]


def image_list_with_ids(images, slices=None) -> Tuple[list, List[Optional[str]]]:
    """`as_image_list`, and one id per image: for an image given as a file path, the path (`"<path>#slice=<k>"` for
    slice `k` of a multi-slice DICOM / NIfTI file, as `decode_images` names them); `None` for one given in memory."""
    expanded, ids = [], []
    for image, image_id in iter_images_with_ids(images, slices):
        expanded.append(image)
        ids.append(image_id)
    return expanded, ids


def iter_images_with_ids(images, slices=None):
    """`image_list_with_ids`, an image (and its id) at a time: the slices of one file are read when the images before
    them were used, so that a caller preprocessing each image holds one volume's slices at a time, not every
    slice of every volume at full resolution."""
    if images is None:
        raise TypeError("Expected images (PIL, numpy, tensors, file paths, or a datasets.Dataset), got None.")
    if hasattr(images, "column_names") and isinstance(images.column_names, dict):  # a `DatasetDict`: which split?
        raise TypeError(f"Expected images, got a DatasetDict of the splits {sorted(images.column_names)}: pass one "
                        f"split (`dataset['train']`).")
    if hasattr(images, "column_names"):  # a `datasets.Dataset`
        images = dataset_image_records(images)
    if isinstance(images, (PIL.Image.Image, str, os.PathLike, bytes, dict)) or is_medical_slice(images) or \
            _is_file_record(images) or (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim <= 3):
        images = [images]
    elif not isinstance(images, Iterable):
        raise TypeError(f"Expected images (PIL, numpy, tensors, file paths, a list of them, or a datasets.Dataset), "
                        f"got {type(images).__name__}.")
    for index, image in enumerate(images):
        name = None
        if _is_file_record(image):  # `datasets.Image(decode=False)`: its bytes, else the file
            name, image = image.get("path"), record_source(image)
        if isinstance(image, bytes):  # an encoded image file's contents, as `datasets` keeps them
            suffix = medical_record_suffix(image, name)
            if suffix:  # a DICOM / NIfTI file's bytes: its slices, read from a file
                with medical_bytes_as_file(image, name, suffix) as path:
                    items = read_medical_file(path, slices)
                for item in items:  # as `decode_images` names them
                    yield item, slice_id(name or f"<bytes #{index}>", item.slice_index)
                continue
            try:  # decoded here, where its record is known: PIL decodes lazily
                image = PIL.Image.open(io.BytesIO(image))
                image.load()
            except (OSError, SyntaxError) as error:
                raise OSError(f"Cannot read image {name or f'#{index}'} (the bytes of a datasets record): "
                              f"{error}") from error
        elif isinstance(image, dict):
            raise TypeError(f"Expected images, got a dict with keys {sorted(image)}: pass its image (a dataset row's "
                            f"`row['image']`; the image processor's output goes to the model as `pixel_values`).")
        pages = None if is_medical_path(image) else image_pages(image)
        if is_medical_path(image):
            for item in read_medical_file(image, slices):
                yield item, slice_id(os.fspath(image), item.slice_index)
        elif pages:
            for index, page in enumerate(pages):
                yield page, slice_id(os.fspath(image), index)
        else:
            yield image, os.fspath(image) if isinstance(image, (str, os.PathLike)) else None


def preprocess_images(
    images: Union[ImageInput, Sequence[ImageInput]], resolution: int, resize_mode: str = "pad",
    intensity_window: str = "percentile",
) -> torch.Tensor:
    """Preprocesses one image or a list of images into a float tensor `(N, 1, resolution, resolution)` in [-1, 1].

    A 4-D tensor or array is read as a batch (`(N, C, H, W)` for tensors, `(N, H, W, C)` for arrays); a DICOM or
    NIfTI file gives one row per slice (see `as_image_list`).
    """
    pixels: List[torch.Tensor] = [image_to_pixels(image, resolution, resize_mode, intensity_window)
                                  for image in as_image_list(images)]
    if not pixels:
        raise ValueError("No images to preprocess.")
    return pixels_to_model_input(torch.stack(pixels))
