"""Model cards and Hub uploads for trained MicDiffRep classifiers."""

import os
import shutil
import tempfile
from typing import Optional


# Files of a model folder that belong on the Hub (features, caches and checkpoints stay local).
HUB_FILES = (".json", ".safetensors", ".py", ".md", ".png")


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
*MicDiffRep* (Zhu & Zhao, 2024). Made with [mic-diffrep](https://github.com/).

## Usage

```python
import mic_diffrep  # registers the model with the Auto classes
from transformers import pipeline

classify = pipeline("image-classification", model="path/or/repo-id")
classify("slice.jpg")
```

Without mic-diffrep installed, load with `trust_remote_code=True` (the code files are in this repository).

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
    from huggingface_hub import ModelCard

    path = os.path.join(output_dir, "README.md")
    ModelCard(model_card_text(results)).save(path)
    return path


def push_to_hub(model_dir: str, repo_id: str, token: Optional[str] = None, private: bool = False,
                commit_message: str = "Upload MicDiffRep classifier") -> str:
    """Uploads a model folder made by `training/linear_probe.py` to the Hub; returns the repository id.

    The uploaded folder holds the config and weights, the image processor, the model card, results and plots, and
    the code files with `auto_map` entries, so `AutoModelForImageClassification` / `AutoImageProcessor` load it with
    `trust_remote_code=True` where mic-diffrep is not installed.
    """
    from huggingface_hub import HfApi

    from .image_processing_mic_diffrep import MicDiffRepImageProcessor

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json).")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as staging:
        for name in sorted(os.listdir(model_dir)):
            if os.path.isfile(os.path.join(model_dir, name)) and name.endswith(HUB_FILES):
                shutil.copy2(os.path.join(model_dir, name), os.path.join(staging, name))
        processor = MicDiffRepImageProcessor.from_pretrained(model_dir)
        MicDiffRepImageProcessor.register_for_auto_class("AutoImageProcessor")
        try:
            processor.save_pretrained(staging)  # writes its auto_map and copies its code file
        finally:
            MicDiffRepImageProcessor._auto_class = None
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=staging, commit_message=commit_message)
    return repo_id
