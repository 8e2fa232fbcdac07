"""A Gradio demo page for a trained MicDiffRep classifier: upload a slice, see what the model sees, its class
probabilities, and an occlusion saliency map.

The page takes the image files PIL reads (JPEG, PNG, TIFF, ...), and DICOM (`.dcm`) and NIfTI (`.nii`, `.nii.gz`)
files through `mic_diffrep.data.medical` (the middle of the slices the model reads, in the file's own display window
when it has one). Uploads are deleted from the server after 10 minutes and when it stops (`DELETE_CACHE`).
Saliency is occlusion: each patch of the model input is blacked out in turn and the drop of the top class's
probability is recorded; the model's noise is fixed, so the map is deterministic. Gradio is imported only by
[`build_demo`] and [`launch_demo`] (`pip install gradio`); [`read_upload`] and [`occlusion_saliency`] need only
torch, numpy and PIL.

Example:

```python
>>> from mic_diffrep.demo import build_demo, launch_demo
>>> demo = build_demo("runs/mic-diffrep/model")  # doctest: +SKIP
>>> demo.launch()  # doctest: +SKIP
>>> launch_demo("runs/mic-diffrep/model", port=7861)  # the same, in one call  # doctest: +SKIP

```
"""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Union

import huggingface_hub
import numpy as np
import PIL.Image
import torch

from .data.folders import IMAGE_EXTENSIONS
from .data.medical import MedicalSlice, SliceSelection, is_medical_file
from .inference import load_classifier, model_slices
from .models.mic_diffrep import MicDiffRepForImageClassification, MicDiffRepImageProcessor
from .models.mic_diffrep.preprocessing import image_pages
from .utils import check_folder, error_summary


if TYPE_CHECKING:
    import gradio


logger = logging.getLogger(__name__)

DISPLAY_SIZE = 256
# The key of `PIL.Image.info` under which `read_upload` records which page of a stack it read: (index, count).
PAGE_INFO = "mic_diffrep_page"
# Uploads (a DICOM file holds the patient's name) and the images shown are deleted from the server's disk once older
# than this many seconds, checked as often, and all of them when the server stops: gradio's `delete_cache`.
DELETE_CACHE = (600, 600)


class UploadError(ValueError):
    """An uploaded file that cannot be read as an image; the message is meant for the page."""


def read_upload(path: Union[str, os.PathLike], slices: Optional[SliceSelection] = None
                ) -> Union[PIL.Image.Image, MedicalSlice]:
    """Reads an uploaded JPEG, PNG, DICOM or NIfTI file into what the image processor takes.

    JPEG / PNG / TIFF / ... files are opened with PIL as they are (the image processor makes them grey; of a
    multi-page TIFF, the middle page). For DICOM and NIfTI,
    the middle of the slices `slices` keeps (default: `SliceSelection()`, the non-empty axial slices; the demo
    page passes the model's own, `mic_diffrep.inference.model_slices`), as a [`MedicalSlice`] in the file's own
    units: the image processor windows it with the model's `intensity_window`, as `predict` does. Raises
    [`UploadError`] with a readable message for anything else.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    lower = name.lower()
    if is_medical_file(path):  # `.dcm`, `.dicom`, `.ima`, `.nii`, `.nii.gz`, or a DICOM file without an extension
        try:
            kept = (slices or SliceSelection()).read(path)
        except (ValueError, OSError) as error:  # MedicalImageError is a ValueError
            raise UploadError(str(error).replace(path, name)) from error  # no server paths on the page
        if not kept:
            raise UploadError(f"{name}: the file has no image slices (among those the model reads).")
        return kept[len(kept) // 2]  # windowed once, by the processor (an 8-bit copy here was windowed twice)
    if not lower.endswith(IMAGE_EXTENSIONS):
        raise UploadError(f"{name}: unsupported file type; upload an image (JPEG, PNG, TIFF, ...), a DICOM (.dcm, "
                          f".dicom, .ima, or a DICOM file without an extension) or NIfTI (.nii, .nii.gz) file.")
    try:
        with PIL.Image.open(path) as image:
            pages = image_pages(image)  # a stack of slices: the middle one, as of a volume
            if pages:
                page = pages[len(pages) // 2]
                page.info[PAGE_INFO] = (len(pages) // 2, len(pages))  # which one, for the status line
                return page
            image.load()
            return image.copy()
    except PIL.Image.DecompressionBombError as error:
        raise UploadError(f"{name}: the image is too large to open ({error}).") from error
    except (PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise UploadError(f"{name} is not a readable image (it may be corrupt or truncated).") from error


def _patch_positions(size: int, patch_size: int, stride: int) -> List[int]:
    """Start offsets of patches along one axis, the last one flush with the edge so every pixel is covered."""
    if patch_size >= size:
        return [0]
    positions = list(range(0, size - patch_size + 1, stride))
    if positions[-1] + patch_size < size:
        positions.append(size - patch_size)
    return positions


@torch.no_grad()
def occlusion_saliency(
    model: MicDiffRepForImageClassification,
    pixel_values: torch.Tensor,
    patch_size: int = 8,
    stride: int = 8,
    batch_size: int = 64,
    target: Optional[int] = None,
    fill_value: float = -1.0,
) -> torch.Tensor:
    """Occlusion saliency `(H, W)` in [0, 1] of one preprocessed image.

    Every `patch_size` x `patch_size` patch (moved by `stride`) of `pixel_values` is set to `fill_value` (-1, black,
    the MRI background), the occluded copies go through the model in batches of `batch_size`, and each pixel gets the
    mean drop of the `target` class's probability (default: the top class) over the patches covering it. Drops are
    clipped at 0 (hiding a patch that makes the class more likely is not evidence for it) and divided by the
    largest, so the map is 0 everywhere when no patch lowers the probability.

    Args:
        model: the classifier (its noise is fixed, so the map is deterministic).
        pixel_values: `(1, C, H, W)` or `(C, H, W)` model input, as made by [`MicDiffRepImageProcessor`].
    """
    if pixel_values.ndim == 3:
        pixel_values = pixel_values.unsqueeze(0)
    if pixel_values.ndim != 4 or pixel_values.shape[0] != 1:
        raise ValueError(f"Expected one image of shape (1, C, H, W) or (C, H, W), got {tuple(pixel_values.shape)}.")
    if min(patch_size, stride, batch_size) < 1:
        raise ValueError("patch_size, stride and batch_size must be positive.")
    pixel_values = pixel_values.to(model.device)
    height, width = pixel_values.shape[-2:]
    base = model(pixel_values).logits.float().softmax(dim=-1)[0]
    target = int(base.argmax()) if target is None else target

    boxes = [(top, left) for top in _patch_positions(height, patch_size, stride)
             for left in _patch_positions(width, patch_size, stride)]
    drops = []
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start : start + batch_size]
        occluded = pixel_values.repeat(len(chunk), 1, 1, 1)
        for i, (top, left) in enumerate(chunk):
            occluded[i, :, top : top + patch_size, left : left + patch_size] = fill_value
        probabilities = model(occluded).logits.float().softmax(dim=-1)[:, target]
        drops.append((base[target] - probabilities).cpu())
    drops = torch.cat(drops)

    total = torch.zeros(height, width)
    count = torch.zeros(height, width)
    for (top, left), drop in zip(boxes, drops):
        total[top : top + patch_size, left : left + patch_size] += drop
        count[top : top + patch_size, left : left + patch_size] += 1
    saliency = (total / count).clamp(min=0)
    peak = saliency.max()
    return saliency / peak if peak > 0 else saliency


def _scalar(value) -> float:
    """A grey channel's mean / std: a float, or the first entry of a per-channel list."""
    return float(np.asarray(value, dtype=np.float64).reshape(-1)[0])


def pixel_values_to_image(pixel_values: torch.Tensor, processor: MicDiffRepImageProcessor) -> np.ndarray:
    """The grey uint8 `(H, W)` image the model sees: the processor's normalisation and rescaling undone."""
    x = pixel_values.detach().float().cpu().reshape(pixel_values.shape[-2:])
    if processor.do_normalize:
        x = x * _scalar(processor.image_std) + _scalar(processor.image_mean)
    if processor.do_rescale:
        x = x / _scalar(processor.rescale_factor)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


def _jet(values: np.ndarray) -> np.ndarray:
    """The jet colour map (blue -> cyan -> yellow -> red) for values in [0, 1], as RGB floats in [0, 1]."""
    values = values[..., None]
    centres = np.array([3.0, 2.0, 1.0])  # red, green, blue
    return np.clip(1.5 - np.abs(4.0 * values - centres), 0.0, 1.0)


def overlay_saliency(image: np.ndarray, saliency: Union[np.ndarray, torch.Tensor], alpha: float = 0.6,
                     size: int = DISPLAY_SIZE) -> PIL.Image.Image:
    """A jet-coloured `saliency` map (`(H, W)` in [0, 1]) over the grey uint8 `image`, as an RGB image of
    `size` x `size` (at least the image's own size); the colour's opacity grows with the saliency, up to `alpha`."""
    size = max(size, *image.shape)
    grey = np.asarray(PIL.Image.fromarray(image).resize((size, size), PIL.Image.Resampling.BICUBIC), dtype=np.float64)
    saliency = np.asarray(saliency, dtype=np.float32)
    heat = np.asarray(PIL.Image.fromarray(saliency).resize((size, size), PIL.Image.Resampling.BILINEAR))
    heat = np.clip(heat, 0.0, 1.0)
    weight = alpha * heat[..., None]
    blended = (1.0 - weight) * (grey[..., None] / 255.0) + weight * _jet(heat)
    return PIL.Image.fromarray((blended * 255).round().astype(np.uint8))


def explain(model: MicDiffRepForImageClassification, processor: MicDiffRepImageProcessor, image,
            patch_size: Optional[int] = None, batch_size: int = 64
            ) -> Tuple[PIL.Image.Image, Dict[str, float], PIL.Image.Image]:
    """What the page shows for one image: the model input (upscaled for display), the class probabilities and
    the occlusion saliency overlay. `patch_size` defaults to an eighth of the model's resolution."""
    pixel_values = processor(image, return_tensors="pt")["pixel_values"].to(model.device)
    with torch.no_grad():
        probabilities = model(pixel_values).logits.float().softmax(dim=-1)[0].cpu()
    patch_size = patch_size or max(1, pixel_values.shape[-1] // 8)
    saliency = occlusion_saliency(model, pixel_values, patch_size=patch_size, stride=patch_size,
                                  batch_size=batch_size, target=int(probabilities.argmax()))
    grey = pixel_values_to_image(pixel_values[0], processor)
    size = max(DISPLAY_SIZE, *grey.shape)
    model_input = PIL.Image.fromarray(grey).resize((size, size), PIL.Image.Resampling.NEAREST)
    labels = {model.config.id2label[i]: float(p) for i, p in enumerate(probabilities)}
    return model_input, labels, overlay_saliency(grey, saliency, size=size)


def load_demo_model(model: Union[str, os.PathLike, MicDiffRepForImageClassification],
                    processor: Optional[MicDiffRepImageProcessor] = None, local_files_only: bool = True,
                    revision: Optional[str] = None) -> Tuple[MicDiffRepForImageClassification, MicDiffRepImageProcessor]:
    """The model in eval mode and its image processor, from a model, a local folder or a Hub id (at `revision`, a
    branch, tag or commit; offline unless `local_files_only=False`). A model given without a processor gets the
    default one at its resolution."""
    if isinstance(model, (str, os.PathLike)):
        name = os.fspath(model)
        if os.path.isfile(name):
            check_folder(name, "Model folder", "the model folder (from `mic-diffrep probe` or `run`)")
        if os.path.isdir(name):
            model, folder_processor = load_classifier(name, revision=revision)  # (a revision refused: local)
        else:
            try:  # its snapshot, loaded as a local folder is (never through the Auto classes: no code of its own)
                folder = huggingface_hub.snapshot_download(name, revision=revision, local_files_only=local_files_only)
            except (OSError, ValueError, huggingface_hub.errors.HFValidationError) as error:
                hint = (" (it is not in the local cache; to download it pass local_files_only=False, or "
                        "--allow_download to `mic-diffrep demo`)") if local_files_only else ""
                raise FileNotFoundError(f"Cannot load a classifier from {name!r}: not a local folder, nor a Hub id "
                                        f"that loads ({error_summary(error)}){hint}.") from error
            model, folder_processor = load_classifier(folder)
        processor = processor if processor is not None else folder_processor
    elif processor is None and isinstance(model, MicDiffRepForImageClassification):
        processor = MicDiffRepImageProcessor(resolution=model.config.resolution)
    if not isinstance(model, MicDiffRepForImageClassification):
        raise TypeError(f"Expected a MicDiffRepForImageClassification or a folder / Hub id of one, got "
                        f"{type(model).__name__}.")
    return model.eval(), processor


def _escape_markdown(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]<>#|~])", r"\\\1", text)


class _CollectWarnings(logging.Handler):
    """The warnings mic-diffrep logs while a file is read (a 4-D NIfTI's volumes beyond the first, ...), for the
    page."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("mic_diffrep").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("mic_diffrep").removeHandler(self)


def _what_was_read(image, path: str, notes: List[str], model_input: PIL.Image.Image) -> str:
    """What the status line says besides the prediction: which slice of a file was classified, the warnings of
    reading it (server paths cut to the file's name), and a blank image (one grey level) that says nothing."""
    name = os.path.basename(path)
    lines = [note.replace(path, name) for note in notes]
    if isinstance(image, MedicalSlice) and image.slice_index is not None:
        lines.insert(0, f"Classified slice index {image.slice_index} of the file's {image.num_slices} (the middle of "
                        f"the slices the model reads).")
    elif isinstance(image, PIL.Image.Image) and PAGE_INFO in image.info:
        index, count = image.info[PAGE_INFO]
        lines.insert(0, f"Classified page index {index} of the file's {count} (the middle one).")
    low, high = model_input.getextrema()
    if low == high:
        lines.append("The model input is blank (one grey level): its prediction says nothing about the image.")
    return "".join(f"\n\n{_escape_markdown(line)}" for line in lines)


def build_demo(model: Union[str, os.PathLike, MicDiffRepForImageClassification],
               processor: Optional[MicDiffRepImageProcessor] = None, title: Optional[str] = None,
               local_files_only: bool = True, patch_size: Optional[int] = None,
               delete_cache: Optional[Tuple[int, int]] = DELETE_CACHE, revision: Optional[str] = None
               ) -> "gradio.Blocks":
    """The demo page for a classifier (a model, a local folder or a Hub id, see [`load_demo_model`]).

    Layout: the upload ("MRI slice"), a "Classify" button and a status line on the left; "Model input",
    "Class probabilities" and "Occlusion saliency" on the right. Unreadable uploads show their problem in the status
    line. `patch_size` is the occlusion patch (default: an eighth of the model's resolution). `delete_cache`:
    gradio's `(frequency, age)` in seconds: uploads and shown images older than `age` are deleted from the server
    every `frequency`, and all of them when it stops (default `DELETE_CACHE`, 10 minutes; `None` keeps them).
    """
    import gradio as gr

    model, processor = load_demo_model(model, processor, local_files_only=local_files_only, revision=revision)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    title = title or "MicDiffRep MRI slice classifier"
    # a volume is read along the model's slice axis and range (those its probe was trained on)
    slices = model_slices(processor) if isinstance(processor, MicDiffRepImageProcessor) else None

    def classify(path: Optional[str]):
        empty = (None, None, None)
        if not path:
            return *empty, "Upload a file first."
        try:
            with _CollectWarnings() as read_warnings:
                image = read_upload(path, slices)
            model_input, probabilities, overlay = explain(model, processor, image, patch_size)
        except UploadError as error:
            return *empty, f"**Could not read the upload.** {_escape_markdown(str(error))}"
        except Exception as error:  # shown as one line on the page; the traceback goes to the server log
            logger.exception("Classifying %s failed", path)
            return *empty, (f"**Could not classify this file** ({type(error).__name__}: "
                            f"{_escape_markdown(str(error))}).")
        top = max(probabilities, key=probabilities.get)
        return model_input, probabilities, overlay, (
            f"**Prediction: {_escape_markdown(top)}** ({probabilities[top]:.1%}). Red in the saliency map: the "
            f"regions whose occlusion lowers this probability the most."
            f"{_what_was_read(image, path, read_warnings.messages, model_input)}")

    retention = (f" Uploads are deleted from the server after {delete_cache[1] // 60 or 1} minute(s), and when it "
                 f"stops." if delete_cache else "")
    with gr.Blocks(title=title, delete_cache=delete_cache) as demo:
        gr.Markdown(f"# {title}\nUpload an MRI slice (JPEG, PNG, TIFF, DICOM `.dcm` / `.dicom` or NIfTI `.nii` / "
                    f"`.nii.gz`; of a volume, the middle of the slices the model reads). Classes: "
                    f"{', '.join(labels)}. A frozen diffusion UNet's features with an MSFA head; a research demo, not "
                    f"a medical device.{retention}")
        with gr.Row():
            with gr.Column():
                # no file_types: a DICOM file without an extension (IM0001) could not be chosen; read_upload checks
                upload = gr.File(label="MRI slice", type="filepath", elem_id="upload")
                button = gr.Button("Classify", variant="primary", elem_id="classify")
                status = gr.Markdown("Upload a file and press Classify.", elem_id="status", label="Status")
            with gr.Column():
                input_image = gr.Image(label="Model input", type="pil", format="png", interactive=False,
                                       elem_id="model-input")
                label = gr.Label(label="Class probabilities", num_top_classes=len(labels),
                                         elem_id="probabilities")
                saliency_image = gr.Image(label="Occlusion saliency", type="pil", format="png", interactive=False,
                                    elem_id="saliency")
        button.click(classify, inputs=upload, outputs=[input_image, label, saliency_image, status])
    return demo


def launch_demo(model_dir: Union[str, os.PathLike], host: str = "127.0.0.1", port: int = 7860, share: bool = False,
                local_files_only: bool = True, revision: Optional[str] = None):
    """Builds the demo for `model_dir` (a folder, or a Hub id at `revision`) and serves it at `http://host:port`
    (blocking)."""
    demo = build_demo(model_dir, local_files_only=local_files_only, revision=revision)
    return demo.launch(server_name=host, server_port=port, share=share)
