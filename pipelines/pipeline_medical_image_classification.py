"""The transformers pipeline for `"medical-image-classification"`: the image-classification pipeline, but the
images go to the model's image processor as they are, so 16-bit and float images, DICOM and NIfTI files are read
the way `mic-diffrep predict` reads them.

transformers' own `"image-classification"` pipeline first turns every path and PIL image into 8-bit RGB
(`transformers.image_utils.load_image`): a 16-bit slice saturates to white, a float image to black, and a DICOM or
NIfTI file cannot be opened. `import mic_diffrep` registers this task.

```python
>>> import mic_diffrep
>>> from transformers import pipeline
>>> classify = pipeline("medical-image-classification", model="runs/mic-diffrep/model")  # doctest: +SKIP
>>> classify("slice_16bit.png", top_k=2)  # doctest: +SKIP
[{'label': 'glioma', 'score': 0.97}, {'label': 'meningioma', 'score': 0.02}]
>>> per_slice = classify("scan.nii.gz")  # a volume: one list of scores per non-empty slice  # doctest: +SKIP
>>> per_slice[0][0]  # each score says its slice's index in the file  # doctest: +SKIP
{'label': 'glioma', 'score': 0.91, 'slice': 12}

```
"""

import os
from typing import Any, Dict

import numpy as np
import torch
from transformers.image_utils import load_image
from transformers.pipelines import ImageClassificationPipeline

from mic_diffrep.data.decoding import source_file
from mic_diffrep.models.mic_diffrep.preprocessing import dataset_image_records, image_list_with_ids


class NoDefaultModel(dict):
    """The registered task's `default`: transformers' `pipeline(task)` without `model=` looks a default model up in
    it, and this task has none (nothing is downloaded), so the lookup says what to pass instead of `KeyError`.
    Other lookups find nothing: the pipeline's `save_pretrained` writes the task, this `{}` included, into the
    model's config."""

    def __contains__(self, key) -> bool:
        if key != "model":
            return False
        raise ValueError('pipeline("medical-image-classification") needs `model=`: a model folder written by '
                         '`mic-diffrep probe` or `mic-diffrep run` (e.g. "runs/mic-diffrep/model"), or the Hub '
                         "repository of one; the task has no default model.")


class MedicalImageClassificationPipeline(ImageClassificationPipeline):
    """`ImageClassificationPipeline` that hands paths, PIL images, arrays and tensors to the image processor
    unconverted (an `http(s)://` URL is still fetched by transformers). A file of several slices (a multi-frame
    DICOM file, a NIfTI volume) gives one list of scores per slice it keeps, in the order `mic-diffrep predict`
    lists them, even when only one is kept, each score with its slice's index in the file (`"slice"`, the `k` of
    predict's `"<path>#slice=<k>"`: empty slices are left out, so list positions are not slice indices). A batch
    given as one 4-D array or tensor gives one list per image. A 2-D image gives one list, as the
    image-classification pipeline does, and a list of images or a `datasets.Dataset` (its `image` column) one list
    per image. Takes the image-classification pipeline's arguments
    (`top_k`, `function_to_apply`, `batch_size`: volumes and 4-D batches need `batch_size=1` when several inputs are
    given), and the image processor's slice options for one call
    (`slice_axis`, `slice_range`, `keep_empty_slices`; another axis drops the model's range, as in `predict`)."""

    def _sanitize_parameters(self, slice_axis=None, slice_range=None, keep_empty_slices=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        slices = {name: value for name, value in (("slice_axis", slice_axis), ("slice_range", slice_range),
                                                  ("keep_empty_slices", keep_empty_slices)) if value is not None}
        if slices:
            preprocess_params["slices"] = slices
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, image, timeout=None, slices=None) -> Dict[str, Any]:
        if isinstance(image, str) and image.startswith(("http://", "https://")):
            image = load_image(image, timeout=timeout)
        elif isinstance(image, os.PathLike):
            image = os.fspath(image)
        if hasattr(self.image_processor, "slice_settings_for"):  # the model's slices, with this call's changes
            slices = self.image_processor.slice_settings_for(**(slices or {}))
        elif slices:
            raise ValueError(f"{type(self.image_processor).__name__} has no slice options: {sorted(slices)} apply "
                             f"to a MicDiffRepImageProcessor only.")
        images, ids = image_list_with_ids(image, slices)  # a file is read once, its slices handed on
        volume = any(image_id is not None and "#slice=" in image_id for image_id in ids)
        stacked = isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4  # a batch in one array
        if (volume or stacked) and getattr(self, "_several_per_batch", False):
            name = image if isinstance(image, str) else (
                image.get("path") if isinstance(image, dict) and image.get("path") else type(image).__name__)
            what = f"a file of {len(images)} slices" if volume else f"a batch of {len(images)} images"
            raise ValueError(f"{name}: {what} needs batch_size=1 (its images are one batch already); or classify "
                             f"them one by one.")
        model_inputs = self.image_processor(images=images, return_tensors="pt").to(self.dtype)
        model_inputs["several"] = torch.tensor([volume or stacked])
        # A slice's index in its file (-1: not a slice), for the scores: the empty slices a volume drops would
        # otherwise leave its list's positions unmatched to its slices.
        model_inputs["slices"] = torch.tensor([
            int(image_id.rpartition("#slice=")[2]) if image_id and source_file(image_id) != image_id else -1
            for image_id in ids])
        return model_inputs

    def __call__(self, inputs=None, **kwargs):
        # Pipelines batch by splitting the model's output into one row per input; a volume's rows would be split
        # into other inputs' results, so `preprocess` refuses volumes when several inputs share a batch.
        if "images" in kwargs:
            inputs = kwargs.pop("images")
        if hasattr(inputs, "column_names"):  # a `datasets.Dataset`: one input per row (its records, undecoded)
            inputs = list(dataset_image_records(inputs))
            if not inputs:
                raise ValueError("The datasets.Dataset holds no images to classify.")
        batch_size = kwargs.get("batch_size") or self._batch_size or 1
        several = isinstance(inputs, (list, tuple)) and len(inputs) > 1 or not isinstance(
            inputs, (str, os.PathLike, list, tuple, dict)) and hasattr(inputs, "__iter__") and not hasattr(
            inputs, "shape")
        self._several_per_batch = batch_size > 1 and several
        return super().__call__(inputs, **kwargs)

    def _forward(self, model_inputs):
        several, slices = model_inputs.pop("several"), model_inputs.pop("slices")
        return {"logits": super()._forward(model_inputs)["logits"], "several": several, "slices": slices}

    def postprocess(self, model_outputs, function_to_apply=None, top_k=5):
        logits = model_outputs["logits"]
        if not bool(model_outputs["several"].reshape(-1)[0]):
            return super().postprocess({"logits": logits}, function_to_apply=function_to_apply, top_k=top_k)
        slices = model_outputs["slices"].reshape(-1).tolist()
        per_image = [super(MedicalImageClassificationPipeline, self).postprocess(
            {"logits": logits[i : i + 1]}, function_to_apply=function_to_apply, top_k=top_k)
            for i in range(len(logits))]
        for scores, index in zip(per_image, slices):
            if index >= 0:
                for score in scores:
                    score["slice"] = index
        return per_image
