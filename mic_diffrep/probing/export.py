"""The probe's outputs on disk: results, plots, and (for a diffusion model) the transformers model folder."""

import json
import os

from ..models.mic_diffrep import MicDiffRepImageProcessor
from ..reporting.hub import default_repo_id, push_to_hub
from ..reporting.model_card import write_model_card
from ..reporting.plotting import plot_accuracy_vs_timestep, plot_confusion_matrix
from ..reporting.results import results_markdown
from .arguments import ProbeArguments


def write_results(output_dir: str, results: dict, label_names) -> None:
    """`results.json`, `results.md`, `accuracy_vs_timestep.png` (MicDiffRep only) and `confusion_matrix.png` in
    `output_dir`."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(results_markdown(results))
    if results.get("method", "micdiffrep") == "micdiffrep":  # baselines read no timesteps: no curve to draw
        plot_accuracy_vs_timestep(results["single_layer"], results["msfa_per_timestep"],
                                  os.path.join(output_dir, "accuracy_vs_timestep.png"))
    plot_confusion_matrix(results["msfa"]["test"]["all"]["confusion_matrix"], label_names,
                          os.path.join(output_dir, "confusion_matrix.png"), title="MSFA, test split")


def write_model_folder(extractor, probe, results: dict, label_names, args: ProbeArguments) -> bool:
    """Saves the classifier (frozen model + MSFA head), its image processor and model card into `args.output_dir`,
    and uploads it with `args.push_to_hub`. Returns `False` when the extractor cannot be exported (baselines)."""
    msfa = results["msfa"]
    model = extractor.classifier(probe.head, probe.mean, probe.std, msfa["layers"], msfa["timesteps"], label_names,
                                 args, args.hidden_size, args.dropout)
    if model is None:
        return False
    model.save_pretrained(args.output_dir)
    preprocessing = extractor.preprocessing
    MicDiffRepImageProcessor(resolution=preprocessing.resolution, resize_mode=preprocessing.resize_mode,
                             intensity_window=preprocessing.intensity_window, slice_axis=args.slice_axis,
                             slice_range=None if args.slice_range is None else list(args.slice_range),
                             keep_empty_slices=args.keep_empty_slices).save_pretrained(args.output_dir)
    write_model_card(args.output_dir, results)
    if args.push_to_hub:
        push_to_hub(args.output_dir, default_repo_id(args.output_dir, args.hub_model_id),
                    token=args.hub_token, private=args.hub_private_repo)
    return True
