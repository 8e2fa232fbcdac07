"""The probe's outputs on disk: results, plots, and (for a diffusion model) the transformers model folder."""

import os
from typing import Optional, Sequence

from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_NAME

from ..data import TEST_IMAGES_FILE
from ..models.mic_diffrep import MicDiffRepImageProcessor, modeling_mic_diffrep
from ..reporting.model_card import write_model_card
from ..reporting.plotting import plot_accuracy_vs_timestep, plot_confusion_matrix
from ..reporting.results import results_markdown
from ..utils import share_as_umask_allows, write_json
from ..features import DiffusionFeatureExtractor, FeatureArguments
from .arguments import ProbeArguments
from .heads import TrainedProbe
from .selection import checked_label_names


# What a probe writes into its output folder besides its feature caches (which a later probe reuses): results, plots,
# the test images' list and, for a diffusion model, the model folder (with the model's code files for the Hub).
PROBE_FILES = ("results.json", "results.md", "accuracy_vs_timestep.png", "confusion_matrix.png", TEST_IMAGES_FILE,
               CONFIG_NAME, SAFE_WEIGHTS_NAME, "preprocessor_config.json", "README.md")
_MODEL_CODE_FILES = tuple(sorted(name for name in os.listdir(os.path.dirname(modeling_mic_diffrep.__file__))
                                 if name.endswith(".py") and name != "__init__.py"))


def check_new_probe(output_dir: str, overwrite_output_dir: bool) -> bool:
    """Refuses a probe into an `output_dir` holding an earlier probe's results or model, unless
    `--overwrite_output_dir`: they were overwritten file by file, and a baseline's probe (results only) left the
    earlier classifier beside its results. Returns whether there is an earlier probe to replace."""
    held = [name for name in ("results.json", CONFIG_NAME, SAFE_WEIGHTS_NAME)
            if os.path.isfile(os.path.join(output_dir, name))]
    if held and not overwrite_output_dir:
        raise ValueError(f"{output_dir} holds an earlier probe's outputs ({', '.join(held)}). Replace them with "
                         f"--overwrite_output_dir, or give another --output_dir; nothing was changed.")
    return bool(held)


def remove_earlier_probe(output_dir: str) -> None:
    """Removes an earlier probe's results and model from `output_dir` (`--overwrite_output_dir`), so that the new
    probe's files are not mixed with them; feature caches stay."""
    for name in PROBE_FILES + _MODEL_CODE_FILES:
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            os.remove(path)


def write_results(output_dir: str, results: dict, label_names) -> None:
    """`results.json`, `results.md`, `accuracy_vs_timestep.png` (MicDiffRep only) and `confusion_matrix.png` in
    `output_dir`."""
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, "results.json"), results)
    with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(results_markdown(results))
    if results.get("method", "micdiffrep") == "micdiffrep":  # baselines read no timesteps: no curve to draw
        plot_accuracy_vs_timestep(results["single_layer"], results["msfa_per_timestep"],
                                  os.path.join(output_dir, "accuracy_vs_timestep.png"))
    plot_confusion_matrix(results["msfa"]["test"]["all"]["confusion_matrix"], label_names,
                          os.path.join(output_dir, "confusion_matrix.png"), title="MSFA, test split")


def probe_classifier(pipeline, probe: TrainedProbe, layers: Sequence[str], timesteps: Sequence[int],
                     label_names: Sequence[str], features: Optional[FeatureArguments] = None):
    """The classifier of a pipeline and a trained MSFA probe, as `mic-diffrep probe` exports it: a
    `MicDiffRepForImageClassification` in eval mode and its `MicDiffRepImageProcessor`, to `save_pretrained` into one
    folder (which `from_pretrained` and `transformers.pipeline` then load). `probe`, `layers` and `timesteps` are
    those `run_probes` chose; `features`: the read-out the features were extracted with (pooling, noise draws, flip
    averaging; default: `extract_features`' defaults). Its predictions are `probe.predict` of those features.

    ```py
    >>> results, probes = run_probes(train, train_labels, test, test_labels, names, validation)  # doctest: +SKIP
    >>> model, processor = probe_classifier(pipe, probes["msfa"], results["msfa"]["layers"],
    ...                                     results["msfa"]["timesteps"], names)  # doctest: +SKIP
    >>> model.save_pretrained("runs/model"); processor.save_pretrained("runs/model")  # doctest: +SKIP

    ```
    """
    head = probe.head
    hidden_size = head.aggregate.out_features if head.aggregate is not None else 0
    model = DiffusionFeatureExtractor(pipeline).classifier(head, probe.mean, probe.std, layers, timesteps,
                                                           checked_label_names(label_names),
                                                           features or FeatureArguments(),
                                                           hidden_size, head.dropout.p)
    return model, _image_processor(pipeline.preprocessing, pipeline.slice_settings)


def _image_processor(preprocessing, slice_settings: dict) -> MicDiffRepImageProcessor:
    """The classifier's image processor: the pretraining's preprocessing, and the slices of volumes it reads."""
    return MicDiffRepImageProcessor(resolution=preprocessing.resolution, resize_mode=preprocessing.resize_mode,
                                    intensity_window=preprocessing.intensity_window, **slice_settings)


def write_model_folder(extractor, probe, results: dict, label_names, args: ProbeArguments,
                       output_dir: Optional[str] = None) -> bool:
    """Saves the classifier (frozen model + MSFA head), its image processor and model card into `output_dir`
    (default `args.output_dir`). Returns `False` when the extractor cannot be exported (baselines)."""
    output_dir = output_dir or args.output_dir
    msfa = results["msfa"]
    model = extractor.classifier(probe.head, probe.mean, probe.std, msfa["layers"], msfa["timesteps"], label_names,
                                 args, args.hidden_size, args.classifier_dropout)
    if model is None:
        return False
    model.save_pretrained(output_dir)
    share_as_umask_allows(os.path.join(output_dir, SAFE_WEIGHTS_NAME))
    _image_processor(extractor.preprocessing, {
        "slice_axis": args.slice_axis, "slice_range": None if args.slice_range is None else list(args.slice_range),
        "keep_empty_slices": args.keep_empty_slices}).save_pretrained(output_dir)
    write_model_card(output_dir, results)
    return True
