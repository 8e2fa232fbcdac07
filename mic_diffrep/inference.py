"""Using a trained classifier folder: class probabilities for image files, and metrics on a labelled folder.

```python
>>> from mic_diffrep.inference import predict_files
>>> predict_files("runs/mic-diffrep/model", ["slice.jpg", "more_slices/"])  # doctest: +SKIP
[{'file': 'slice.jpg', 'label': 'glioma', 'probabilities': {'glioma': 0.91, ...}}, ...]

```

DICOM (`.dcm`, `.dicom`) and NIfTI (`.nii`, `.nii.gz`) files are read slice by slice, by default the slices the
model's probe was trained on (`model_slices`): each slice gets its own prediction, named `"<path>#slice=<k>"` when
the file holds several.
"""

import itertools
import json
import logging
import os
from collections import Counter
from typing import Dict, List, Optional, Sequence, Union

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers.utils import CONFIG_NAME

from .data import (SEARCHED_WHAT, TEST_IMAGES_FILE, SliceSelection, check_labelled, decode_images,
                   find_image_files, label_by_class_folder, load_image_folder, pixels_to_model_input, read_image_list,
                   relative_image_id, select_splits)
from .data.decoding import source_file
from .data.folders import HOW_TO_SAVE, datasets_format
from .data.medical import slice_selection
from .models.mic_diffrep import MicDiffRepConfig, MicDiffRepForImageClassification, MicDiffRepImageProcessor
from .models.mic_diffrep.preprocessing import undecoded_images
from .reporting.metrics import classification_report
from .utils import error_summary, model_folder, precision_dtype, progress_interval


logger = logging.getLogger(__name__)


def not_a_classifier(path: str) -> Optional[str]:
    """What a folder people mistake for a classifier folder is, and which folder to give instead, as a sentence (a
    `mic-diffrep run` folder, or a pretrained pipeline); `None` for any other folder."""
    run_model = os.path.join(path, "model")
    if os.path.isfile(os.path.join(path, "pretrain", "model_index.json")):
        return (f"{path!r} is a `mic-diffrep run` folder: its classifier is {run_model!r}"
                + ("." if os.path.isfile(os.path.join(run_model, "config.json")) else
                   ", which its probe has not written yet (run the same command again to finish it)."))
    if os.path.isfile(os.path.join(path, "model_index.json")):
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), "model")
        if os.path.isfile(os.path.join(beside, "config.json")):
            return f"{path!r} is a pretrained pipeline, not a classifier: the classifier of its run is {beside!r}."
        return (f"{path!r} is a pretrained pipeline, not a classifier: make one from it with `mic-diffrep probe "
                f"--pretrained {path} --data_dir DATA_DIR --output_dir runs/model`.")
    return None


def load_classifier(model_dir: str, mixed_precision: Optional[str] = None, revision: Optional[str] = None):
    """The model and image processor of a folder written by `mic-diffrep probe` / `run`; `mixed_precision="bf16"`
    loads the UNet in bf16 (the head and the standardisation stay float32, as in the probe). By default the UNet runs
    in the precision its head was trained on (`config.mixed_precision`; a head trained on fp16 features, which a CPU
    cannot run, gets float32). `revision`: of a Hub repository id (a branch, tag or commit; default main)."""
    model_dir = model_folder(model_dir, "Model folder", "the folder that holds its config.json",
                             "; train one with `mic-diffrep probe` or `mic-diffrep run`", revision=revision)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        if os.path.isfile(os.path.join(model_dir, "results.json")):  # a baseline's probe: scored, not exported
            raise FileNotFoundError(f"{model_dir!r} holds a probe's results but no model (config.json): a baseline "
                                    f"encoder's probe is scored only; a MicDiffRep probe writes a classifier.")
        raise FileNotFoundError(not_a_classifier(model_dir) or f"Model folder {model_dir!r} has no config.json; "
                                f"train one with `mic-diffrep probe` or `mic-diffrep run`.")
    check_classifier_folder(model_dir)
    try:
        if mixed_precision is None:
            mixed_precision = getattr(MicDiffRepConfig.from_pretrained(model_dir), "mixed_precision", "no")
            if mixed_precision == "fp16":
                mixed_precision = "no"
        model = MicDiffRepForImageClassification.from_pretrained(model_dir, dtype=precision_dtype(mixed_precision),
                                                                 use_safetensors=True)
        processor = MicDiffRepImageProcessor.from_pretrained(model_dir)
    except (OSError, SafetensorError, RuntimeError, ValueError, KeyError, TypeError) as error:  # a missing,
        # truncated or broken file of the folder, or a config its weights do not fit
        raise ValueError(f"Model folder {model_dir!r} cannot be loaded ({error_summary(error)}); is it complete? "
                         f"Train it again with `mic-diffrep probe` or copy it anew.") from error
    return model.eval(), processor


PREPROCESSOR_FILE = "preprocessor_config.json"


def check_classifier_folder(model_dir: str) -> None:
    """Refuses a folder whose config does not name a MicDiffRep classifier, from its JSON alone. The folder is then
    loaded by the MicDiffRep classes themselves, never through the Auto classes: a folder naming other classes or
    code of its own (`auto_map`) would get them imported, or a terminal asked whether to run its code."""
    kinds = {name: _json_field(os.path.join(model_dir, name), key)
             for name, key in ((CONFIG_NAME, "model_type"), (PREPROCESSOR_FILE, "image_processor_type"))}
    if kinds[CONFIG_NAME] != MicDiffRepConfig.model_type or kinds[PREPROCESSOR_FILE] not in (
            None, MicDiffRepImageProcessor.__name__):
        raise ValueError(f"{model_dir!r} is not a MicDiffRep classifier folder (its model_type is "
                         f"{kinds[CONFIG_NAME]!r}, its image processor {kinds[PREPROCESSOR_FILE]!r}); none of its "
                         f"code was run.")


def _json_field(path: str, key: str):
    """`key` of the JSON object in file `path`; `None` when the file is missing or holds no such key; a clear error
    when it is not JSON."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} cannot be read as JSON ({error_summary(error)}).") from None
    return value.get(key) if isinstance(value, dict) else None


@torch.no_grad()
def predict_probabilities(model, pixel_values: torch.Tensor, batch_size: int = 16,
                          show_progress: bool = False) -> torch.Tensor:
    """Softmax probabilities `(N, num_labels)` for preprocessed `pixel_values` (float in [-1, 1], or the uint8
    pixels of `decode_images`, converted a batch at a time: as float32 all at once they took 4x their memory), in
    batches."""
    chunks = []
    for start in tqdm(range(0, len(pixel_values), batch_size), desc="Classifying", unit="batch",
                      disable=not show_progress, mininterval=progress_interval()):
        batch = pixel_values[start : start + batch_size]
        if batch.dtype == torch.uint8:
            batch = pixels_to_model_input(batch)
        chunks.append(model(batch.to(model.device)).logits.float().softmax(dim=-1).cpu())
    return torch.cat(chunks)


def model_slices(processor: MicDiffRepImageProcessor,
                 slices: Optional[Union[SliceSelection, Dict]] = None) -> SliceSelection:
    """The slices of DICOM / NIfTI files to read for a model: `slices` itself (a `SliceSelection`), else the model's
    own (those its probe was trained on, in its image processor's config) with the settings a dict of `slices`
    changes (`{"slice_axis": 0}`, as the command line's slice flags give them; another axis drops the model's
    `slice_range`, which counts slices along its own)."""
    if isinstance(slices, SliceSelection):
        return slices
    return slice_selection(**processor.slice_settings_for(**(slices or {})))


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")


def image_files(paths: Sequence[str]) -> List[str]:
    """The image files named by `paths`: files as given, folders searched recursively (sorted) for images, DICOM and
    NIfTI files (`SEARCHED_EXTENSIONS`), hidden files and folders left out as the folder loaders leave them out."""
    files = []
    for path in paths:
        if datasets_format(path):
            raise ValueError(f"{path!r} is {datasets_format(path)}, not images: {HOW_TO_SAVE}.")
        if os.path.isdir(path):
            found = find_image_files(path)
            if not found:
                raise FileNotFoundError(f"No images in folder {path!r} (looked for {SEARCHED_WHAT}).")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"Image file or folder not found: {path}")
    return files


BLANK_WARNING = "blank model input (one grey level): the prediction says nothing about the image"


def predict_files(model_dir: str, paths: Union[str, Sequence[str]], batch_size: int = 16,
                  mixed_precision: Optional[str] = None, skip_bad_images: bool = False,
                  slices: Optional[Union[SliceSelection, Dict]] = None, revision: Optional[str] = None) -> List[Dict]:
    """Class probabilities for image files and folders: one dict per image with its top `label` and all
    `probabilities`, in file order; an unreadable file raises a `BadImageError` naming it, or with `skip_bad_images`
    gets a dict with its `error` (and `label` / `probabilities` `None`), so every file given is accounted for. An
    image blank after preprocessing (one grey level) has a `warning` too.

    A DICOM / NIfTI file gives one dict per slice (chosen by `slices`, default the model's: `model_slices`), whose
    `file` is `"<path>#slice=<k>"` for multi-slice files.
    """
    _check_batch_size(batch_size)
    files = image_files([paths] if isinstance(paths, (str, os.PathLike)) else paths)
    model, processor = load_classifier(model_dir, mixed_precision, revision)
    show_progress = len(files) > batch_size  # one batch of files is done before a bar would say anything
    decoded = decode_images(files, processor.preprocessing, skip_bad_images=skip_bad_images,
                            show_progress=show_progress, slices=model_slices(processor, slices))
    probabilities = predict_probabilities(model, decoded.pixels, batch_size, show_progress=show_progress)
    labels = [model.config.id2label[i] for i in range(probabilities.shape[1])]
    blank = (decoded.pixels.amax(dim=(1, 2, 3)) == decoded.pixels.amin(dim=(1, 2, 3))).tolist()
    if any(blank):
        logger.warning("%d of the %d images are blank after preprocessing (one grey level): their predictions say "
                       "nothing about them.", sum(blank), len(blank))
    predicted = iter(zip(decoded.paths, probabilities, blank))  # in file order, then slice order
    errors = {item["path"]: item["error"] for item in decoded.skipped}
    rows_per_file = Counter(source_file(path) for path in decoded.paths)  # a file given twice: twice its slices
    times_given = Counter(files)
    rows = []
    for file in files:  # as given, a file given twice twice
        if file in errors:
            rows.append({"file": file, "label": None, "probabilities": None, "error": errors[file]})
            continue
        for path, p, is_blank in itertools.islice(predicted, rows_per_file[file] // times_given[file]):
            rows.append({"file": path, "label": labels[int(p.argmax())],
                         "probabilities": {label: round(float(v), 6) for label, v in zip(labels, p)}})
            if is_blank:
                rows[-1]["warning"] = BLANK_WARNING
    return rows


def evaluate_folder(model_dir: str, data_dir: str, splits: Optional[Union[str, Sequence[str]]] = None,
                    batch_size: int = 16, mixed_precision: Optional[str] = None, skip_bad_images: bool = False,
                    slices: Optional[Union[SliceSelection, Dict]] = None, image_list: Optional[str] = None,
                    revision: Optional[str] = None) -> Dict:
    """Accuracy, macro F1, per-class recall and confusion matrix of a model folder on a labelled image folder.

    `splits` defaults to the `test` split when the folder has split folders with one, else every image. Each slice
    of a DICOM / NIfTI file (chosen by `slices`, default the model's: `model_slices`) counts as one example with its
    file's label. `image_list`: a file of image ids relative to `data_dir` (the `test_images.txt` a probe writes,
    e.g. of the test split it carved from a folder without one): only those are scored, from every split unless
    `splits` says otherwise.
    """
    _check_batch_size(batch_size)
    dataset_dict = load_image_folder(data_dir)  # a bad folder, split or label fails before the (slower) model load
    wanted = read_image_list(image_list, root=data_dir) if image_list else None
    splits = [splits] if isinstance(splits, str) else splits
    splits = list(splits) if splits else (["test"] if "test" in dataset_dict and not wanted else ["all"])
    chosen, dataset = select_splits(dataset_dict, splits, "splits")
    if wanted:
        dataset = _listed_files(dataset, data_dir, wanted, image_list,
                                None if splits == ["all"] or set(chosen) == set(dataset_dict) else chosen)
    elif "test" not in dataset_dict:
        _warn_if_probed_on(model_dir, data_dir)
    # One class folder reads as unlabelled (`Testing/glioma/`) or as labelled by its patients' folders
    # (`Testing/glioma/patient1/`): the model's classes tell which. A Hub repository is resolved once, so that the
    # classes and the model come from one commit.
    try:
        folder = model_folder(model_dir, "Model folder", "", revision=revision)
    except (OSError, ValueError):  # said by `load_classifier`, after the data's own errors
        folder = None
    class_names = _class_names(folder) if folder else []
    dataset = label_by_class_folder(dataset, data_dir, class_names)
    check_labelled(dataset, data_dir, "evaluation", "class sub-folders, or one named as a class of the model")
    unknown = sorted(set(dataset.features["label"].names) - set(class_names)) if class_names else []
    if unknown:  # before the model is loaded and the images decoded
        raise ValueError(f"{data_dir} has classes {unknown} the model does not know ({class_names}).")
    model, processor = load_classifier(folder or model_dir, mixed_precision, None if folder else revision)
    decoded = decode_images(dataset, processor.preprocessing, skip_bad_images=skip_bad_images,
                            slices=model_slices(processor, slices))
    if wanted:
        ids, wanted = [relative_image_id(path, data_dir) for path in decoded.paths], set(wanted)
        skipped = {relative_image_id(item["path"], data_dir) for item in decoded.skipped}
        missing = sorted(image_id for image_id in wanted - set(ids) if source_file(image_id) not in skipped)
        if missing:
            raise ValueError(f"--image_list {image_list}: {len(missing)} listed slice(s) are not among the slices "
                             f"read from their files (e.g. {missing[0]!r}); pass the slice flags the list was "
                             f"made with.")
        decoded = decoded.subset([i for i, image_id in enumerate(ids) if image_id in wanted])
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    unknown = sorted(set(decoded.label_names) - set(names))
    if unknown:
        raise ValueError(f"{data_dir} has classes {unknown} the model does not know ({names}).")
    references = torch.tensor([names.index(decoded.label_names[i]) for i in decoded.labels.tolist()])
    probabilities = predict_probabilities(model, decoded.pixels, batch_size, show_progress=True)
    report = classification_report(probabilities.argmax(dim=1).tolist(), references.tolist(), names)
    report.update({"model": model_dir, "data_dir": data_dir, "splits": ["all"] if splits == ["all"] else chosen,
                   "image_list": image_list, "skipped_images": decoded.skipped})
    return report


def _class_names(model_dir: str) -> List[str]:
    """The class names in a model folder's `config.json`, read without loading the model (none when it cannot be
    read: `load_classifier` reports that)."""
    try:
        id2label = _json_field(os.path.join(model_dir, CONFIG_NAME), "id2label")
        return [str(id2label[key]) for key in sorted(id2label, key=int)] if isinstance(id2label, dict) else []
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _listed_files(dataset, data_dir: str, wanted: Sequence[str], image_list: str,
                  splits: Optional[Sequence[str]] = None):
    """The rows of `dataset` (of `data_dir`, or of its `splits` only) whose file an image list names (relative to
    `data_dir`); every listed file must be there."""
    files = [relative_image_id(item["path"], data_dir) if item.get("path") else None
             for item in undecoded_images(dataset)["image"]]
    listed = {source_file(image_id) for image_id in wanted}
    missing = sorted(listed - set(files))
    if missing and splits:
        raise ValueError(f"--image_list {image_list}: {len(missing)} listed file(s) are not in the split(s) "
                         f"{', '.join(splits)} of {data_dir} (e.g. {missing[0]!r}); leave --splits out to look in "
                         f"every split.")
    if missing:
        raise ValueError(f"--image_list {image_list}: {len(missing)} listed file(s) are not in {data_dir} (e.g. "
                         f"{missing[0]!r}); the list's paths are relative to the folder the probe read.")
    return dataset.select([i for i, file in enumerate(files) if file in listed])


def _warn_if_probed_on(model_dir: str, data_dir: str) -> None:
    """Every image of a folder without a test split is scored: warn when the model's probe carved its test split from
    this folder, so the score includes the images the head was trained on."""
    results_file = os.path.join(model_dir, "results.json")
    try:
        with open(results_file, encoding="utf-8") as f:
            results = json.load(f)
        probed_on = results.get("data_dir")
    except (OSError, ValueError, AttributeError):
        return
    carved = str(results.get("test_split", "")).startswith("carved")  # not a --test_data_dir or a test split
    if carved and probed_on and os.path.exists(probed_on) and os.path.samefile(probed_on, data_dir):
        logger.warning("%s has no test split: scoring all of its images, including those %s was trained on. For the "
                       "test split its probe carved, pass --image_list %s.", data_dir, model_dir,
                       os.path.join(model_dir, TEST_IMAGES_FILE))
