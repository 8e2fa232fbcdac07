"""Result files people read: the probe's `results.md` and the report of `mic-diffrep run`."""

import os
from typing import Optional

from ..utils import format_score


# How a run's `mixed_precision` setting reads in a report.
PRECISION_NAMES = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}


def _skipped_note(skipped) -> str:
    """A sentence on the unreadable files `--skip_bad_images` left out (empty when none)."""
    if not skipped:
        return ""
    names = ", ".join(f"`{item['path']}`" for item in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
    return f" {len(skipped)} unreadable file(s) skipped (`--skip_bad_images`; all in results.json): {names}."


def results_markdown(results: dict) -> str:
    """The results as Markdown: SL accuracy for every layer x timestep, SL-best, MSFA, per-class recall."""
    timesteps = sorted({r["timestep"] for r in results["single_layer"]})
    layers = list(dict.fromkeys(r["layer"] for r in results["single_layer"]))
    table = {(r["layer"], r["timestep"]): r for r in results["single_layer"]}
    msfa, sl = results["msfa"], results["sl_best"]
    lines = [
        "# Linear probing results", "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['environment']['processor']}, {results['environment']['cpu_count']} CPUs, "
        f"torch {results['environment']['torch']}", "",
        f"Pretrained model: `{results['pretrained']}`  ",
        f"Test split: {results['test_split']}  ",
        f"Images: {results['num_train']} train, {results['num_validation']} validation ("
        f"{results.get('validation_split') or 'carved from the training split, near-duplicate groups kept on one side'}"
        f"), {results['num_test']} test; "
        f"{results['leakage']['num_near']} test images have a near-duplicate in the training images."
        + _skipped_note(results.get("skipped_images"))
        + (f" **{results['test_images_seen_in_pretraining']} of the test images were pretraining images (unlabelled)."
           f"**" if results.get("test_images_seen_in_pretraining") else "")
        + "".join(f" **{warning}**" for warning in results.get("class_warnings", [])), "",
        "| method | layers | timesteps | accuracy | macro F1 | accuracy (de-duplicated test) |", "|---|---|---|---|---|---|",
    ]
    ms_name, sl_name = ("MicDiffRep-MS", "MicDiffRep-SL-best") if results.get("method", "micdiffrep") == "micdiffrep" \
        else (f"{results['method']} (MSFA head)", f"{results['method']} (linear)")
    for name, row, layer_text, t_text in (
        (ms_name, msfa, ", ".join(msfa["layers"]), ", ".join(map(str, msfa["timesteps"]))),
        (sl_name, sl, sl["layer"], str(sl["timestep"])),
    ):
        dedup = row["test"].get("deduplicated", {}).get("accuracy")
        lines.append(f"| {name} | {layer_text} | {t_text} | {row['test']['all']['accuracy']:.3f} | "
                     f"{row['test']['all']['macro_f1']:.3f} | {format_score(dedup)} |")
    names = results["label_names"]
    lines += ["", "Per-class recall (test):", "", "| method | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for name, row in ((ms_name, msfa), (sl_name, sl)):
        recall = row["test"]["all"]["per_class_recall"]
        lines.append(f"| {name} | " + " | ".join(format_score(recall[n]) for n in names) + " |")
    lines += ["", "Single-layer probes, test accuracy (SL-best is chosen on validation accuracy):", "",
              "| layer | " + " | ".join(f"t={t}" for t in timesteps) + " |", "|---|" + "---|" * len(timesteps)]
    for layer in layers:
        lines.append(f"| {layer} | " + " | ".join(f"{table[(layer, t)]['test_accuracy']:.3f}" for t in timesteps) + " |")
    curve = {r["timestep"]: r["test_accuracy"] for r in results["msfa_per_timestep"]}
    lines.append("| MSFA (all layers) | " + " | ".join(f"{curve[t]:.3f}" for t in timesteps) + " |")
    return "\n".join(lines) + "\n"


def held_out(image_list: Optional[str]) -> str:
    """How a report names the images pretraining left out (`--exclude_image_list`)."""
    return f", less the test images listed in `{os.path.basename(image_list)}`" if image_list else ""


def run_report_markdown(report: dict) -> str:
    """`report.md` of `mic-diffrep run`: pretraining, sample grid, probe results and plots."""
    pre, files = report["pretraining"], report["files"]
    rel = {k: os.path.relpath(v, report["config"]["output_dir"]) for k, v in files.items() if v}
    lines = [
        "# mic-diffrep run", "",
        f"Command: `{report['command']}`", "",
        "## Pretraining", "",
        f"{pre['num_images']} images ({', '.join(pre['splits'])}"
        f"{held_out(pre.get('exclude_image_list'))}"
        f") of `{pre['train_data_dir']}` at {pre['resolution']} px, "
        f"{pre['num_parameters'] / 1e6:.2f}M-parameter UNet, {pre['global_step']} steps in "
        f"{format_score(pre['train_minutes'], 1)} minutes ({format_score(pre['images_per_second'], 1)} images/s, "
        f"{PRECISION_NAMES.get(pre['mixed_precision'], pre['mixed_precision'])}), final loss "
        f"{format_score(pre['final_loss'], 4)}.",
        "",
    ]
    if "sample_grid" in rel:
        lines += [f"![samples]({rel['sample_grid']})", ""]
    lines += [
        "## Linear probing", "",
        results_markdown(report["probe"]).split("\n", 2)[2],
        f"![accuracy vs timestep]({rel['accuracy_vs_timestep']})", "",
        f"![confusion matrix]({rel['confusion_matrix']})", "",
    ]
    if report.get("hub"):  # `--push_to_hub`
        lines += ["## On the Hub", "",
                  f"- classifier: [{report['hub']['model']}](https://huggingface.co/{report['hub']['model']})",
                  f"- pretrained pipeline: [{report['hub']['pipeline']}](https://huggingface.co/{report['hub']['pipeline']})",
                  ""]
    return "\n".join(lines)
