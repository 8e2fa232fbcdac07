"""Model cards of trained MicDiffRep classifiers (the `README.md` of a model folder)."""

import os

from huggingface_hub import ModelCard

from .. import __version__


def model_card_text(results: dict) -> str:
    """A model card: what the model is, how it was trained and evaluated, its metrics, intended use and limits."""
    msfa, sl = results["msfa"], results["sl_best"]
    test = msfa["test"]["all"]
    recall = ", ".join(f"{name} {value:.3f}" for name, value in test["per_class_recall"].items())
    dedup = msfa["test"].get("deduplicated")
    dedup_line = (f"- accuracy on the {dedup['num_examples']} test images without a near-duplicate in the training "
                  f"images: **{dedup['accuracy']:.3f}**\n" if dedup else "")
    labels = ", ".join(results["label_names"])
    return f"""---
library_name: transformers
pipeline_tag: image-classification
license: apache-2.0
tags:
- mic-diffrep
- medical-imaging
- diffusion
- self-supervised
- linear-probe
---

# MicDiffRep classifier ({labels})

A frozen DDPM-pretrained `UNet2DModel` used as a feature extractor, with an MSFA head (multi-scale feature
aggregation: concatenated pooled block features -> Linear -> ReLU -> Linear -> softmax), following
*MicDiffRep* (Zhu & Zhao, 2024). Made with mic-diffrep {__version__} (`pip install mic-diffrep`).

## Usage

```python
import mic_diffrep  # registers the model with the Auto classes and the medical-image-classification pipeline
from transformers import pipeline

classify = pipeline("medical-image-classification", model="path/or/repo-id")
classify("slice.jpg")  # also 16-bit and float images, DICOM and NIfTI files (one list of scores per slice)
```

transformers' own `pipeline("image-classification", ...)` gives the same scores for 8-bit images (it converts
every image to 8-bit RGB first). A copy on the Hub uploaded by mic-diffrep (`--push_to_hub`) holds the code files:
where mic-diffrep is not installed, load it with `trust_remote_code=True`.

## Training and evaluation

- Pretrained pipeline: `{results['pretrained']}`; resolution {results['features']['resolution']} px, grey.
- Features: blocks {', '.join(msfa['layers'])} at timesteps {', '.join(map(str, msfa['timesteps']))},
  {results['features']['pooling']} pooling, fixed noise (seed {results['features']['noise_seed']}), standardised.
  Layers and timesteps were chosen on a validation split carved from the training split.
- Probe: {results['probe_config']['num_epochs']} epochs, Adam(W) lr {results['probe_config']['learning_rate']},
  cosine annealing, batch {results['probe_config']['train_batch_size']}, hidden size {results['probe_config']['hidden_size']}.
- Data: `{results['data_dir']}`; {results['num_train']} train, {results['num_validation']} validation,
  {results['num_test']} test images. Test split: {results['test_split']}.

## Metrics (test split)

- accuracy **{test['accuracy']:.3f}**, macro F1 **{test['macro_f1']:.3f}**
- per-class recall: {recall}
{dedup_line}- best single layer ({sl['layer']}, t={sl['timestep']}): accuracy {sl['test']['all']['accuracy']:.3f}

## Intended use

Research on self-supervised representations for medical image classification, and a baseline for comparing
pretraining methods under a fixed linear-probe protocol.

## Limitations

- **Not a medical device.** It was not validated clinically and must not be used for diagnosis or treatment.
- Public brain-MRI datasets hold exact and near-duplicate slices across their official splits; accuracy on such
  splits overstates generalisation. The de-duplicated figure above and cross-source evaluations are better guides.
- Trained on {results['num_train'] + results['num_validation']} images of one public collection: performance on other
  scanners, protocols, populations or pathologies is unknown.
"""


def write_model_card(output_dir: str, results: dict) -> str:
    """Writes `README.md` (the model card) into `output_dir`; returns its path."""
    path = os.path.join(output_dir, "README.md")
    ModelCard(model_card_text(results)).save(path)
    return path
