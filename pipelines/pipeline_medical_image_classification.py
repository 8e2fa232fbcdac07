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
>>> classify("scan.nii.gz")  # doctest: +SKIP  (a volume: one list of scores per non-empty slice)
```
"""

import os
from typing import Any, Dict

from transformers.image_utils import load_image
from transformers.pipelines import ImageClassificationPipeline


class MedicalImageClassificationPipeline(ImageClassificationPipeline):
    """`ImageClassificationPipeline` that hands paths, PIL images, arrays and tensors to the image processor
    unconverted (an `http(s)://` URL is still fetched by transformers). A multi-frame DICOM file or NIfTI volume
    gives one list of scores per slice, in the order `mic-diffrep predict` lists them; one slice gives one list, as
    the image-classification pipeline does. Takes the image-classification pipeline's arguments (`top_k`,
    `function_to_apply`, `batch_size` for 2-D images)."""

    def preprocess(self, image, timeout=None) -> Dict[str, Any]:
        if isinstance(image, str) and image.startswith(("http://", "https://")):
            image = load_image(image, timeout=timeout)
        elif isinstance(image, os.PathLike):
            image = os.fspath(image)
        model_inputs = self.image_processor(images=image, return_tensors="pt")
        num_slices = len(model_inputs["pixel_values"])
        if num_slices > 1 and getattr(self, "_volume_batch_size", 1) > 1:
            name = image if isinstance(image, str) else type(image).__name__
            raise ValueError(f"{name}: a volume of {num_slices} slices needs batch_size=1 (its slices are one batch "
                             f"already); or classify its slices one by one.")
        return model_inputs.to(self.dtype)

    def __call__(self, inputs=None, **kwargs):
        # Pipelines batch by splitting the model's output into one row per input; a volume's rows would be split
        # into other inputs' results, so `preprocess` refuses volumes when batching.
        self._volume_batch_size = kwargs.get("batch_size") or self._batch_size or 1
        return super().__call__(inputs, **kwargs)

    def postprocess(self, model_outputs, function_to_apply=None, top_k=5):
        logits = model_outputs["logits"]
        if len(logits) == 1:
            return super().postprocess(model_outputs, function_to_apply=function_to_apply, top_k=top_k)
        return [super(MedicalImageClassificationPipeline, self).postprocess(
            {"logits": logits[i : i + 1]}, function_to_apply=function_to_apply, top_k=top_k)
            for i in range(len(logits))]
