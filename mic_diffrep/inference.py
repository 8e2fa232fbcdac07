"""Using a trained classifier folder: class probabilities for image files, and metrics on a labelled folder.

```python
>>> from mic_diffrep.inference import predict_files
>>> predict_files("runs/mic-diffrep/model", ["slice.jpg"])  # doctest: +SKIP
[{'file': 'slice.jpg', 'label': 'glioma', 'probabilities': {'glioma': 0.91, ...}}]
```
"""

import os
from typing import Dict, List, Optional, Sequence

import torch

from .utils import autocast


def load_classifier(model_dir: str):
    """The model and image processor of a folder written by `training/linear_probe.py`."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from . import MicDiffRepForImageClassification  # noqa: F401  (registers the Auto classes)

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"--model {model_dir!r} is not a model folder (no config.json); train one with "
                                f"`mic-diffrep probe` or `mic-diffrep run`.")
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    return model, processor


@torch.no_grad()
def predict_probabilities(model, pixel_values: torch.Tensor, batch_size: int = 64,
                          mixed_precision: Optional[str] = None) -> torch.Tensor:
    """Softmax probabilities `(N, num_labels)` for preprocessed `pixel_values`, in batches."""
    chunks = []
    with autocast(model.device, mixed_precision):
        for start in range(0, len(pixel_values), batch_size):
            logits = model(pixel_values[start : start + batch_size].to(model.device)).logits
            chunks.append(logits.float().softmax(dim=-1).cpu())
    return torch.cat(chunks)


def predict_files(model_dir: str, files: Sequence[str], batch_size: int = 64,
                  mixed_precision: Optional[str] = None) -> List[Dict]:
    """Class probabilities for image files: one dict per file with its top `label` and all `probabilities`."""
    from .data import decode_images
    from .preprocessing import pixels_to_model_input

    model, processor = load_classifier(model_dir)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"Image file(s) not found: {', '.join(missing)}")
    decoded = decode_images(list(files), processor.preprocessing, show_progress=False)
    probabilities = predict_probabilities(model, pixels_to_model_input(decoded.pixels), batch_size, mixed_precision)
    labels = [model.config.id2label[i] for i in range(probabilities.shape[1])]
    return [{"file": path, "label": labels[int(p.argmax())],
             "probabilities": {label: round(float(v), 6) for label, v in zip(labels, p)}}
            for path, p in zip(decoded.paths, probabilities)]


def evaluate_folder(model_dir: str, data_dir: str, splits: Optional[Sequence[str]] = None, batch_size: int = 64,
                    mixed_precision: Optional[str] = None, skip_bad_images: bool = False) -> Dict:
    """Accuracy, macro F1, per-class recall and confusion matrix of a model folder on a labelled image folder.

    `splits` defaults to the `test` split when the folder has one, else every image.
    """
    from .data import decode_images, load_image_folder, select_splits
    from .metrics import classification_report
    from .preprocessing import pixels_to_model_input

    model, processor = load_classifier(model_dir)
    dataset_dict = load_image_folder(data_dir)
    splits = list(splits) if splits else (["test"] if "test" in dataset_dict else ["all"])
    chosen, dataset = select_splits(dataset_dict, splits, "--splits")
    decoded = decode_images(dataset, processor.preprocessing, skip_bad_images=skip_bad_images)
    if decoded.labels is None:
        raise ValueError(f"{data_dir} has no labels (class sub-folders) to evaluate against.")
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    unknown = sorted(set(decoded.label_names) - set(names))
    if unknown:
        raise ValueError(f"{data_dir} has classes {unknown} the model does not know ({names}).")
    references = torch.tensor([names.index(decoded.label_names[i]) for i in decoded.labels.tolist()])
    probabilities = predict_probabilities(model, pixels_to_model_input(decoded.pixels), batch_size, mixed_precision)
    report = classification_report(probabilities.argmax(dim=1).tolist(), references.tolist(), names)
    report.update({"model": model_dir, "data_dir": data_dir, "splits": chosen, "skipped_images": decoded.skipped})
    return report
