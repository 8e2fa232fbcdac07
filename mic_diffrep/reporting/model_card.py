"""Model cards of trained MicDiffRep classifiers (the `README.md` of a model folder) and of pretrained pipelines."""

import os
import shlex
from typing import Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .. import __version__
from ..utils import format_score
from .results import PRECISION_NAMES


TAGS = ["mic-diffrep", "medical-imaging", "diffusion", "self-supervised"]


def _name(path: str) -> str:
    """A local folder's own name (cards are published: the local paths above it stay local); a Hub repository id
    (`user/name`, no such folder here) stays whole."""
    path = str(path)
    if not os.path.exists(path) and not os.path.isabs(path) and path.count("/") == 1:
        return path
    return os.path.basename(os.path.normpath(path)) or path


def _published_argument(argument: str) -> str:
    """A command-line argument as published: a local path (absolute, or one that exists here) cut to its name, also
    in `--flag=PATH`."""
    flag, equals, value = argument.partition("=")
    if equals and flag.startswith("-"):
        return f"{flag}={_published_argument(value)}" if value else argument
    is_path = os.path.isabs(argument) or (os.sep in argument and os.path.exists(argument))
    return _name(argument) if is_path and not argument.startswith("-") else argument


def published_results(results: dict) -> dict:
    """`results` (a probe's `results.json`, or a pretraining's `pretraining_summary.json`) as uploaded: local paths
    cut to their names, as the model cards give them (the data and pretrained folders wherever they appear, skipped
    files and their errors included, and every path among the command's arguments and in the test split's
    description); the local file keeps them whole."""
    folders = {}  # a local folder, as given and absolute -> its name
    for key in ("data_dir", "train_data_dir", "test_data_dir", "pretrained"):
        if results.get(key) and os.sep in os.path.normpath(str(results[key])):
            folders[str(results[key])] = folders[os.path.abspath(str(results[key]))] = _name(results[key])

    def publish(value):
        if isinstance(value, dict):
            return {key: publish(item) for key, item in value.items()}
        if isinstance(value, list):
            return [publish(item) for item in value]
        if isinstance(value, str):
            for folder in sorted(folders, key=len, reverse=True):  # the longest first: a folder inside another
                value = value.replace(folder, folders[folder])
        return value

    published = publish(results)
    if results.get("command"):
        published["command"] = shlex.join(_published_argument(a) for a in shlex.split(results["command"]))
    if results.get("test_split") and "test_data_dir" not in results:  # results written before it was recorded
        published["test_split"] = " ".join(_published_argument(word) for word in str(published["test_split"]).split())
    return published


def _usage(repo_id: Optional[str]) -> str:
    if repo_id is None:  # the local folder: mic-diffrep's own classes load it
        return """```python
import mic_diffrep  # registers the model with the Auto classes and the medical-image-classification pipeline
from transformers import pipeline

classify = pipeline("medical-image-classification", model="path/to/this/folder")
classify("slice.jpg")  # also 16-bit and float images, DICOM and NIfTI files (one list of scores per slice)
```

transformers' own `pipeline("image-classification", ...)` gives the same scores for 8-bit images (it converts
every image to 8-bit RGB first)."""
    return f"""```python
import mic_diffrep  # with mic-diffrep installed: 16-bit and float images, DICOM and NIfTI files
from transformers import pipeline

classify = pipeline("medical-image-classification", model="{repo_id}", trust_remote_code=True)
classify("slice.jpg")  # a volume gives one list of scores per slice
```

Without mic-diffrep (8-bit images; needs `diffusers` for the UNet):

```python
from transformers import pipeline

classify = pipeline("image-classification", model="{repo_id}", trust_remote_code=True)
```"""


_INTENDED_USE = """## Intended use

Research on self-supervised representations for medical image classification, and a baseline for comparing
pretraining methods under a fixed linear-probe protocol.

## Limitations

- **Not a medical device.** It was not validated clinically and must not be used for diagnosis or treatment."""


def _classifier_card_head(metadata: ModelCardData, labels: str, repo_id: Optional[str]) -> str:
    """A classifier card's metadata, title, description and usage, up to its "Training and evaluation" section."""
    return f"""---
{metadata.to_yaml()}
---

# MicDiffRep classifier ({labels})

A frozen DDPM-pretrained `UNet2DModel` used as a feature extractor, with an MSFA head (multi-scale feature
aggregation: concatenated pooled block features -> Linear -> ReLU -> Linear -> softmax), following
*MicDiffRep* (Zhu & Zhao, 2024). Made with mic-diffrep {__version__}.

## Usage

{_usage(repo_id)}

## Training and evaluation
"""


def unevaluated_model_card_text(config, repo_id: Optional[str] = None) -> str:
    """The model card of a classifier folder saved without a probe's `results.json` (`probe_classifier` and
    `save_pretrained` in Python): what it is and how to load it, from its `config`; it records no accuracy."""
    labels = ", ".join(str(config.id2label[i]) for i in range(config.num_labels))
    metadata = ModelCardData(library_name="transformers", pipeline_tag="image-classification", license="apache-2.0",
                             tags=TAGS + ["linear-probe"], model_name=_name(repo_id or "mic-diffrep-classifier"))
    return _classifier_card_head(metadata, labels, repo_id) + f"""
- Features: blocks {', '.join(config.layers)} at timesteps {', '.join(map(str, config.timesteps))},
  {config.pooling} pooling; hidden size {config.hidden_size}.
- **No evaluation is recorded**: the folder was saved without a probe's `results.json` (from Python, say).
  `mic-diffrep evaluate --model MODEL --data_dir FOLDER` scores it on a labelled image folder.

{_INTENDED_USE}
"""


def model_card_text(results: dict, repo_id: Optional[str] = None) -> str:
    """A model card: what the model is, how it was trained and evaluated, its metrics, intended use and limits; its
    metadata holds the test metrics (`model-index`). `repo_id`: the Hub repository it is uploaded to (its usage
    snippet then loads from there). Local paths are cut to their names, in the local card too (`published_results`):
    the folder is shared with it."""
    results = published_results(results)
    msfa, sl = results["msfa"], results["sl_best"]
    test = msfa["test"]["all"]
    recall = ", ".join(f"{name} {format_score(value)}" for name, value in test["per_class_recall"].items())
    dedup = msfa["test"].get("deduplicated")
    dedup_line = (f"- accuracy on the {dedup['num_examples']} test images without a near-duplicate in the training "
                  f"images: **{format_score(dedup['accuracy'])}**\n" if dedup else "")
    labels = ", ".join(results["label_names"])
    dataset = _name(results["data_dir"])
    base_model = results.get("base_model")  # the pipeline's Hub repository, where known
    pipeline = (f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model
                else f"`{_name(results['pretrained'])}`")
    if results.get("pretrained_revision"):  # a Hub repository, read at this commit
        pipeline += f" at commit `{results['pretrained_revision'][:10]}`"
    metadata = ModelCardData(
        base_model=base_model, library_name="transformers", pipeline_tag="image-classification", license="apache-2.0",
        tags=TAGS + ["linear-probe"], metrics=["accuracy", "f1"], model_name=_name(repo_id or "mic-diffrep-classifier"),
        eval_results=[EvalResult(task_type="image-classification", dataset_type=dataset, dataset_name=dataset,
                                 dataset_split="test", metric_type=metric, metric_value=round(float(value), 4),
                                 metric_name=name)
                      for metric, name, value in (("accuracy", "Accuracy", test["accuracy"]),
                                                  ("f1", "Macro F1", test["macro_f1"]))])
    return _classifier_card_head(metadata, labels, repo_id) + f"""
- Pretrained pipeline: {pipeline}; resolution {results['features']['resolution']} px, grey.
- Features: blocks {', '.join(msfa['layers'])} at timesteps {', '.join(map(str, msfa['timesteps']))},
  {results['features']['pooling']} pooling, fixed noise (seed {results['features']['noise_seed']}), standardised.
  Layers and timesteps were chosen on the validation images: {results.get('validation_split') or 'carved from the training split'}.
- Probe: {results['probe_config']['num_epochs']} epochs, Adam(W) lr {results['probe_config']['learning_rate']},
  cosine annealing, batch {results['probe_config']['train_batch_size']}, hidden size {results['probe_config']['hidden_size']}.
- Data: `{dataset}`; {results['num_train']} train, {results['num_validation']} validation,
  {results['num_test']} test images. Test split: {results['test_split']}.

## Metrics (test split)

- accuracy **{test['accuracy']:.3f}**, macro F1 **{test['macro_f1']:.3f}**
- per-class recall: {recall}
{dedup_line}- best single layer ({sl['layer']}, t={sl['timestep']}): accuracy {sl['test']['all']['accuracy']:.3f}

{_INTENDED_USE}
- Medical image collections often hold exact and near-duplicate slices, across their official splits too;
  accuracy on such splits overstates generalisation. The de-duplicated figure above and evaluations on data from
  other sources are better guides.
- Trained on {results['num_train'] + results['num_validation']} images of `{dataset}`: performance on other scanners,
  protocols, populations or pathologies is unknown.
"""


def write_model_card(output_dir: str, results: dict, repo_id: Optional[str] = None) -> str:
    """Writes `README.md` (the model card) into `output_dir`; returns its path."""
    path = os.path.join(output_dir, "README.md")
    ModelCard(model_card_text(results, repo_id)).save(path)
    return path


def pipeline_card_text(summary: dict, repo_id: Optional[str] = None, samples: bool = True,
                       self_conditioned: Optional[bool] = None) -> str:
    """The model card of a pretrained pipeline folder (from its `pretraining_summary.json`; an empty `summary` for
    a pipeline saved without one): what it is, how to load it, how it was trained; `samples`: whether the folder
    holds sample grids (`samples/`); `self_conditioned`: whether its UNet is (default: as the summary's recipe
    says)."""
    if self_conditioned is None:
        self_conditioned = bool(summary.get("recipe", {}).get("self_conditioning"))
    recipe = ", ".join(f"{key} {value}" for key, value in summary.get("recipe", {}).items())
    location = repo_id or "path/to/this/folder"
    steps = summary.get("weights_step", summary.get("global_step"))
    if steps == summary.get("global_step"):
        steps = f"{steps} optimisation steps ({summary.get('stop_reason')})"
    else:  # interrupted after the last save: the folder holds that save's weights
        steps = (f"{steps} optimisation steps (the weights saved last; the run was {summary.get('stop_reason')} at "
                 f"step {summary.get('global_step')}, which its checkpoint continues)")
    if self_conditioned:
        ddpm = ("`diffusers.DDPMPipeline` cannot sample from it: its UNet is self-conditioned (a second input channel "
                "that only `DiffusionFeaturePipeline` feeds).")
    else:
        ddpm = (f"`diffusers.DDPMPipeline.from_pretrained(\"{location}\")` samples from it too (it warns that it "
                f"ignores the preprocessing settings in `model_index.json`).")
    # the Hub infers no task from a custom pipeline class: the card names it (diffusers' DDPM cards do too)
    metadata = ModelCardData(library_name="diffusers", license="apache-2.0",
                             pipeline_tag="unconditional-image-generation",
                             tags=TAGS + ["unconditional-image-generation", "feature-extraction"])
    left_out = (f" (less the test images listed in `{_name(summary['exclude_image_list'])}`, a local file: image "
                f"lists are not uploaded)"
                if summary.get("exclude_image_list") else "")
    return f"""---
{metadata.to_yaml()}
---

# MicDiffRep pretrained pipeline

A DDPM-pretrained diffusers `UNet2DModel` (with its `DDPMScheduler`) for *MicDiffRep* (Zhu & Zhao, 2024): its
block activations at chosen noise levels are image features for medical image classification. Made with
mic-diffrep {__version__}.

## Usage

```python
import torch
from mic_diffrep import DiffusionFeaturePipeline  # needs mic-diffrep installed

pipe = DiffusionFeaturePipeline.from_pretrained("{location}", dtype=torch.bfloat16)
features = pipe.extract_features(["slice.jpg"]).concatenate()    # the MSFA input
samples = pipe(batch_size=4, num_inference_steps=1000).images    # DDPM sampling
```

Plain diffusers loads it as a custom pipeline (its code, `pipeline_diffusion_features.py`, is in this folder;
mic-diffrep must be installed), or as itself once mic-diffrep is imported:

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{location}", custom_pipeline="pipeline_diffusion_features", trust_remote_code=True)
```

{ddpm}

## Training

""" + (f"""- {summary.get('num_images')} unlabelled images of `{_name(summary.get('train_data_dir', ''))}`{left_out} at
  {summary.get('resolution')} px, {steps},
  {summary.get('num_parameters')} parameters, precision {PRECISION_NAMES.get(summary.get('mixed_precision'),
                                                                              summary.get('mixed_precision'))}.
- Recipe: {recipe}.
""" if summary.get("num_images") is not None else
       "Not recorded: the pipeline was saved without the summary `mic-diffrep pretrain` writes.\n") + (
        "- Sample grids: `samples/`.\n" if samples else "")


def write_pipeline_card(output_dir: str, summary: dict, repo_id: Optional[str] = None,
                        self_conditioned: Optional[bool] = None) -> str:
    """Writes `README.md` (the model card) of a pretrained pipeline folder into `output_dir`; returns its path."""
    path = os.path.join(output_dir, "README.md")
    samples = os.path.isdir(os.path.join(output_dir, "samples"))
    ModelCard(pipeline_card_text(summary, repo_id, samples, self_conditioned)).save(path)
    return path
