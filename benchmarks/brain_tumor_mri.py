#!/usr/bin/env python
"""MicDiffRep against MoCo v2, BYOL, MAE (and CLIP) on real brain MRI, at an equal pretraining budget, under
protocols that do not reward memorising duplicates.

    python benchmarks/brain_tumor_mri.py --data_dir DATA_DIR --pretrain_minutes 30 --baselines mae mocov2 byol

Writes `benchmarks/results/brain_tumor_mri.{json,md}` and PNGs beside them.

1. Pretraining: every method on the same 5,708 unlabelled images of `Training/` at 64 px, bf16, for the same
   budget of minutes of its own calibrated throughput (`benchmarks/common.py`). MicDiffRep uses the package's
   default recipe (`mic-diffrep pretrain` with no flags but resolution and budget; chosen in
   `benchmarks/ablations.py`).
2. Features: every UNet block at the default read-out timesteps (bf16, fixed noise), for the pretrained UNet and
   for a random-init UNet of the same config; the baselines' pooled encoder output (fp32).
3. Probes (paper protocol; layers and timesteps chosen on a validation part carved from the training side,
   near-duplicate groups on one side; test scored once): cross-source in both directions (headline) and in-split;
   accuracy on all test images and on the de-duplicated ones. Rows: micdiffrep-ms, micdiffrep-sl-best,
   random-unet-ms, each baseline (MSFA head; `linear_accuracy` in the JSON), pixels-logreg, pixels-1nn.
"""

import argparse
from dataclasses import replace
import json
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (BASELINES, BASELINE_RECIPES, DEFAULT_DATA_DIR, DIRECTIONS, MAX_IMAGES_HELP,  # noqa: E402
                    OVERWRITE_HELP, REPO, Benchmark, HelpFormatter, baseline_recipe, cached_extract,
                    check_recorded_results, command_line, environment_info, feature_cache_name, machine_line,
                    micdiffrep_run, output_prefix, positive_float, positive_int, pretrain_for_budget, probe_protocol,
                    readout_arguments, rendered_lines, run_feature_cache_name, run_main, unet_config, writable_folder)
from diffusers import DDIMScheduler, UNet2DModel  # noqa: E402
from mic_diffrep import DiffusionFeaturePipeline, save_image_grid  # noqa: E402
from mic_diffrep.data import pixels_to_model_input  # noqa: E402
from mic_diffrep.features import ClipFeatureExtractor, DiffusionFeatureExtractor, EncoderFeatureExtractor  # noqa: E402
from mic_diffrep.models.mic_diffrep.unet import create_scheduler  # noqa: E402
from mic_diffrep.probing import ProbeConfig, train_heads  # noqa: E402
from mic_diffrep.reporting import classification_report, plot_accuracy_vs_timestep, plot_confusion_matrix  # noqa: E402
from mic_diffrep.training import BaselinePretrainingArguments, PretrainingArguments, default_recipe  # noqa: E402


logger = logging.getLogger("benchmark")
PROTOCOLS = [direction for direction, _ in DIRECTIONS] + ["in-split"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="Folder holding Training/ and sources.csv.")
    parser.add_argument("--work_dir", type=writable_folder,
                        default=os.path.join(REPO, "runs", "benchmark"), help="Models and caches.")
    parser.add_argument("--output", type=output_prefix,
                        default=os.path.join(REPO, "benchmarks", "results", "brain_tumor_mri"),
                        help="Path prefix of the results: PREFIX.json, PREFIX.md and PREFIX_*.png.")
    parser.add_argument("--resolution", type=positive_int, default=64)
    parser.add_argument("--pretrain_minutes", type=positive_float, default=30.0, help="Pretraining budget of every method.")
    parser.add_argument("--timesteps", type=int, nargs="+", default=None,
                        help="Read-out timesteps (default: the probe's defaults, chosen by the ablations).")
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=list(BASELINES))
    parser.add_argument("--clip_model", default=None, help="A local CLIPVisionModel folder (nothing is downloaded).")
    parser.add_argument("--unet", type=unet_config, default=None,
                        help="UNet preset or config instead of the package default ('mini' for smoke runs: at 64 px "
                             "'tiny' is slower, its attention at 32x32).")
    parser.add_argument("--flip_average", action="store_true",
                        help="Test-time flip averaging for every row alike (MicDiffRep, random UNet, baselines, CLIP).")
    parser.add_argument("--pooling", default=None, choices=["avg", "avgmax"],
                        help="Feature pooling for every row alike (default: the package's, chosen by the ablations; "
                             "avgmax: the average and the max of each block's or encoder's output, concatenated; CLIP "
                             "gives its pooled output either way).")
    parser.add_argument("--max_images", type=positive_int, default=None, help=MAX_IMAGES_HELP)
    parser.add_argument("--note", default="", help="A sentence for the results file (e.g. what else ran).")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seeds pretraining, the carved splits (in-split test, validation parts) and the probes "
                             "(budget_curve.py --seeds varies the pretraining only, on seed 0's splits).")
    parser.add_argument("--overwrite_output", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("--render_only", action="store_true",
                        help="Write OUTPUT.md again from the recorded OUTPUT.json (after a change to how results are "
                             "described); measures nothing, and the file says it was rendered again.")
    args = parser.parse_args()
    bad = [t for t in args.timesteps or () if not 0 <= t < 1000]
    if bad:  # checked before hours of pretraining, not after
        parser.error(f"--timesteps {' '.join(map(str, bad))}: read-out timesteps must be in [0, 1000).")
    if args.clip_model and not os.path.isdir(args.clip_model):
        parser.error(f"--clip_model {args.clip_model} is not a folder: give a local CLIPVisionModel folder (nothing "
                     f"is downloaded).")
    return args


# ------------------------------------------------------------------------------------------------------------------
# Raw-pixel baselines
# ------------------------------------------------------------------------------------------------------------------


def pixels_logreg(train_pixels, train_labels, test_pixels, config, num_labels):
    features = {("pixels", 0): pixels_to_model_input(train_pixels).flatten(1)}
    probe = train_heads(features, train_labels, num_labels, config, hidden_size=0)[("pixels", 0)]
    return probe.predict(pixels_to_model_input(test_pixels).flatten(1))


def pixels_1nn(train_pixels, train_labels, test_pixels):
    train = pixels_to_model_input(train_pixels).flatten(1)
    test = pixels_to_model_input(test_pixels).flatten(1)
    predictions = [train_labels[torch.cdist(test[s : s + 512], train).argmin(dim=1)] for s in range(0, len(test), 512)]
    return torch.cat(predictions)


# ------------------------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------------------------


def rows_for_protocol(protocol, bench, feature_sets, info, config):
    split = bench.split(protocol)
    train_idx, test_idx, leaked = split["train"], split["test"], split["leaked"]
    labels, names = bench.labels, bench.label_names
    common = {"protocol": "in-split" if protocol == "in-split" else "cross-source",
              "direction": None if protocol == "in-split" else protocol, "num_train": len(train_idx),
              "num_test": len(test_idx), "num_test_deduplicated": int((~leaked).sum()),
              "test_images_with_near_duplicate_in_train": int(leaked.sum())}

    def row(method, reports, source=None, **extra):
        full, dedup = reports["all"], reports.get("deduplicated")
        return {**common, "method": method, "accuracy": full["accuracy"], "macro_f1": full["macro_f1"],
                "per_class_recall": full["per_class_recall"], "confusion_matrix": full["confusion_matrix"],
                "accuracy_deduplicated": dedup["accuracy"] if dedup else None, **info.get(source, {}), **extra}

    def reports(predictions):
        test_labels = labels[test_idx]
        return {name: classification_report(predictions[mask].tolist(), test_labels[mask].tolist(), names)
                for name, mask in {"all": torch.ones_like(leaked), "deduplicated": ~leaked}.items() if mask.any()}

    rows, details = [], {}
    for method, features in feature_sets.items():
        results = probe_protocol(features, bench, split, config)
        details[method] = results
        msfa, sl = results["msfa"], results["sl_best"]
        if method.startswith("baseline-"):
            rows.append(row(method, msfa["test"], method, layers=["encoder"], timesteps=[],
                            validation_accuracy=msfa["validation_accuracy"],
                            linear_accuracy=sl["test"]["all"]["accuracy"]))
            continue
        rows.append(row(f"{method}-ms", msfa["test"], method, layers=msfa["layers"], timesteps=msfa["timesteps"],
                        validation_accuracy=msfa["validation_accuracy"]))
        if method == "micdiffrep":
            rows.append(row("micdiffrep-sl-best", sl["test"], method, layers=[sl["layer"]], timesteps=[sl["timestep"]],
                            validation_accuracy=sl["validation_accuracy"]))
    pixels = bench.decoded.pixels
    rows.append(row("pixels-logreg", reports(pixels_logreg(pixels[train_idx], labels[train_idx], pixels[test_idx],
                                                            config, len(names)))))
    rows.append(row("pixels-1nn", reports(pixels_1nn(pixels[train_idx], labels[train_idx], pixels[test_idx]))))
    return rows, details


# ------------------------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------------------------

# The paper's Table 1 (accuracy, %): quoted beside our rows, never used in any computation.
PAPER_TABLE1 = {"micdiffrep-ms": 88, "micdiffrep-sl-best": 83, "baseline-clip": 82, "baseline-byol": 77,
                "baseline-mocov2": 73, "baseline-mae": 69}
TABLE1_ROWS = [("MicDiffRep-MS", "micdiffrep-ms"), ("MicDiffRep-SL-best", "micdiffrep-sl-best"),
               ("CLIP", "baseline-clip"), ("BYOL", "baseline-byol"), ("MoCo v2", "baseline-mocov2"),
               ("MAE", "baseline-mae"), ("random-init UNet (MS)", "random-unet-ms"),
               ("raw pixels (logistic regression)", "pixels-logreg")]


def _found(result):
    return {((r["direction"] or r["protocol"]), r["method"]): r for r in result["results"]}


def summary_table(result):
    found = _found(result)
    lines = ["## The paper's Table 1 under one protocol", "",
             "Accuracy (accuracy on the de-duplicated test images in brackets). Every pretrained method had the same "
             f"budget: {result['pretraining_budget_minutes']:g} minutes of its own throughput on this machine (steps "
             "fixed in advance from a throughput calibration, meant to run with nothing else running: the note "
             "above says what did), on the same unlabelled images, and the "
             "same probe. The paper's figures are its own split and budget (112 px, 200 epochs), quoted for "
             "reference.", "",
             "| method | cross-source sartaj->other | cross-source other->sartaj | in-split | steps | images/s | paper |",
             "|---|---|---|---|---|---|---|"]
    for title, method in TABLE1_ROWS:
        rows = [found.get((protocol, method)) for protocol in PROTOCOLS]
        if not any(rows):
            note = "not run here (needs local weights: `--clip_model DIR`)" if method == "baseline-clip" else "not run"
            paper = f"{PAPER_TABLE1[method] / 100:.2f}" if method in PAPER_TABLE1 else ""
            lines.append(f"| {title} | {note} | | | | | {paper} |")
            continue
        cells = [f"{r['accuracy']:.3f} ({r['accuracy_deduplicated']:.3f})" if r else "" for r in rows]
        first = next(r for r in rows if r)
        steps = first.get("pretraining_steps")
        speed = first.get("pretraining_images_per_second")
        paper = f"{PAPER_TABLE1[method] / 100:.2f}" if method in PAPER_TABLE1 else ""
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {steps if steps is not None else ''} | "
                     f"{f'{speed:.1f}' if speed else ''} | {paper} |")
    return lines + [""]


def targets_table(result):
    found = _found(result)
    lines = ["## Targets", "", "| target | sartaj->other | other->sartaj |", "|---|---|---|"]

    def gap(protocol, a, b, key="accuracy"):
        ra, rb = found.get((protocol, a)), found.get((protocol, b))
        return None if ra is None or rb is None else 100 * (ra[key] - rb[key])

    def best_baseline(protocol, key):
        candidates = [found.get((protocol, m)) for m in ("baseline-mocov2", "baseline-byol")]
        candidates = [c for c in candidates if c]
        return max(candidates, key=lambda r: r[key]) if candidates else None

    for label, key, margin in (("MS >= max(MoCo v2, BYOL) + 2 points, all test images", "accuracy", 2),
                               ("MS >= max(MoCo v2, BYOL) + 2 points, de-duplicated", "accuracy_deduplicated", 2)):
        cells = []
        for protocol, _ in DIRECTIONS:
            best, ms = best_baseline(protocol, key), found.get((protocol, "micdiffrep-ms"))
            if best is None or ms is None:
                cells.append("n/a")
                continue
            value = 100 * (ms[key] - best[key])
            cells.append(f"{value:+.1f} vs {best['method']} ({'met' if value >= margin else 'NOT met'})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = []
    for protocol, _ in DIRECTIONS:
        value = gap(protocol, "micdiffrep-ms", "random-unet-ms")
        cells.append("n/a" if value is None else f"{value:+.1f} ({'met' if value >= 8 else 'NOT met'})")
    lines.append("| MS >= random-init UNet MS + 8 points | " + " | ".join(cells) + " |")
    best, ms = best_baseline("in-split", "accuracy"), found.get(("in-split", "micdiffrep-ms"))
    if best and ms:
        value = 100 * (ms["accuracy"] - best["accuracy"])
        lines += ["", f"In-split: MS - best baseline ({best['method']}) = {value:+.1f} points "
                      f"({'met' if value >= 0 else 'NOT met'})."]
    return lines + [""]


def _flags(recipe) -> str:
    if isinstance(recipe, str):  # results files written before the recipe was recorded
        return recipe
    return " ".join(f"--{key} {value}" for key, value in recipe.items() if value not in (None, False))


def baseline_optimiser() -> str:
    """The contrastive baselines' optimiser, as the package's defaults set it."""
    args = BaselinePretrainingArguments(method="mocov2", train_data_dir="unused")
    return (f"AdamW {args.learning_rate:g}, weight decay {args.adam_weight_decay:g}, {args.lr_scheduler} decay, "
            f"batch {args.train_batch_size}")


def markdown(result, label_names):
    env = result["environment"]
    lines = [
        "# Brain tumour MRI benchmark", "",
        f"Command: `{result['command']}`  ",
        machine_line(env, ("torch", "diffusers", "transformers")), "",
        *rendered_lines(result),
        (f"Data: a random {result['num_images']:,} of the images of `Training/` for the probes (`--max_images`; "
         "pretraining read them all)" if result.get("max_images") else
         f"Data: the {result['num_images']:,} images of `Training/`")
        + f" (4 classes), decoded to {result['resolution']} px grey "
        "(percentile intensity window). Every method pretrains on all of them without labels, the test images of "
        "every protocol included (transductive, alike for every method; `mic-diffrep run` instead leaves a carved "
        "test split out of pretraining). MicDiffRep: the package's default recipe "
        f"(`{_flags(result['recipe'])}`), UNet `{result.get('unet', 'base')}` ({result['num_parameters'] / 1e6:.2f}M "
        f"parameters). Baselines: {result.get('baseline_optimiser', 'AdamW 1e-3, weight decay 0.05, cosine decay')}"
        + "".join(f"; {method}: `{' '.join(flags)}` (`baseline_recipes.md`)"
                  for method, (_, flags) in result.get("baseline_recipes", {}).items()) + ". Probes: the paper's protocol "
        "(Adam 0.01, cosine, batch 128, 15 epochs); MSFA layers/timesteps and SL-best chosen on a validation part "
        "carved from the training side (near-duplicate groups kept on one side); test scored once. Read-out "
        f"timesteps: {', '.join(map(str, result['timesteps']))}"
        + ("; every row's features flip-averaged (each image and its mirror)" if result.get("flip_average") else "")
        + ("; every row's features pooled by average and max over positions, concatenated (CLIP: its pooled output)"
           if result.get("pooling") == "avgmax" else "")
        + ". *dedup* = accuracy on the test images with no "
        "near-duplicate (mirror-aware fingerprints, threshold 0.975) among the training images.", "",
    ]
    if result.get("note"):
        lines += [result["note"], ""]
    lines += summary_table(result) + targets_table(result)
    for protocol in PROTOCOLS:
        rows = [r for r in result["results"] if (r["direction"] or r["protocol"]) == protocol]
        r0 = rows[0]
        title = f"cross-source, {protocol}" if protocol != "in-split" else "in-split (stratified group split, 20% test)"
        lines += [f"## {title}", "",
                  f"{r0['num_train']} train / {r0['num_test']} test images; {r0['test_images_with_near_duplicate_in_train']}"
                  f" test images have a near-duplicate in train ({r0['num_test_deduplicated']} left for *dedup*).", "",
                  "| method | validation | accuracy | macro F1 | accuracy (dedup) | " +
                  " | ".join(f"recall {n}" for n in label_names) + " | layers @ t | steps | train min |",
                  "|---|---|---|---|---|" + "---|" * len(label_names) + "---|---|---|"]
        for r in rows:
            recall = " | ".join(f"{r['per_class_recall'][n]:.3f}" for n in label_names)
            where = ", ".join(r.get("layers") or [])
            if r.get("timesteps"):
                where += " @ " + ", ".join(map(str, r["timesteps"]))
            validation = "" if r.get("validation_accuracy") is None else f"{r['validation_accuracy']:.3f}"
            minutes = "" if r.get("pretraining_wall_minutes") is None else f"{r['pretraining_wall_minutes']:.1f}"
            lines.append(f"| {r['method']} | {validation} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
                         f"{r['accuracy_deduplicated']:.3f} | {recall} | {where} | {r.get('pretraining_steps') or ''} | "
                         f"{minutes} |")
        lines.append("")
    lines += ["*train min* is the wall time the run took; it exceeds the budget where other work paused or slowed "
              "the run (the steps, fixed in advance, are what the budget buys).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------


def render_again(output: str) -> None:
    """`--render_only`: OUTPUT.md from the recorded OUTPUT.json, with the command that rendered it."""
    with open(output + ".json") as f:
        result = json.load(f)
    result["rendered_by"] = command_line()
    label_names = list(result["results"][0]["per_class_recall"])
    with open(output + ".md", "w") as f:
        f.write(markdown(result, label_names))


def main():
    args = parse_args()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if args.render_only:
        return render_again(args.output)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    check_recorded_results(args.output, args.overwrite_output)
    command = command_line()
    bench = Benchmark(args.data_dir, args.work_dir, args.resolution, args.seed, args.max_images)
    feature_args = readout_arguments(args.flip_average, args.pooling, args.timesteps)
    encoder_args = replace(feature_args, timesteps=[0])

    # 1. Pretraining (each method's steps fixed from its calibrated throughput).
    runs = {"micdiffrep": micdiffrep_run(args.pretrain_minutes, args.work_dir, args.data_dir, args.resolution,
                                         args.seed, args.unet)}
    for method in args.baselines:
        runs[f"baseline-{method}"] = pretrain_for_budget(method, args.pretrain_minutes, args.work_dir, args.data_dir,
                                                         args.resolution, args.seed, **baseline_recipe(method))
    info = {name: {"pretraining_steps": run["summary"]["global_step"],
                   "pretraining_budget_minutes": run["budget_minutes"],
                   "pretraining_wall_minutes": run["summary"]["train_minutes"],
                   "pretraining_images_per_second": run["calibration"]["images_per_second"]}
            for name, run in runs.items()}

    # 2. A sample grid (DDIM-50) of the pretrained UNet.
    pipeline = DiffusionFeaturePipeline.from_pretrained(runs["micdiffrep"]["output_dir"], dtype=torch.bfloat16)
    sampler = DiffusionFeaturePipeline(pipeline.unet, DDIMScheduler.from_config(pipeline.scheduler.config))
    images = sampler(batch_size=16, num_inference_steps=50, generator=torch.Generator().manual_seed(args.seed),
                     output_type="np").images
    save_image_grid(images, args.output + "_samples.png")

    # 3. Features.
    extractor = DiffusionFeatureExtractor(pipeline)
    # Cache names (the run folder's name) shared with budget_curve.py, which reuses these runs.
    feature_sets = {"micdiffrep": cached_extract(extractor, bench, feature_args,
                                                 run_feature_cache_name(runs["micdiffrep"], feature_args))[0]}
    torch.manual_seed(args.seed)
    random_unet = UNet2DModel.from_config(pipeline.unet.config).to(torch.bfloat16)  # the same UNet, untrained
    random_extractor = DiffusionFeatureExtractor(DiffusionFeaturePipeline(random_unet, create_scheduler()))
    feature_sets["random-unet"] = cached_extract(random_extractor, bench, feature_args,
                                                 feature_cache_name("random-unet", feature_args))[0]
    for method in args.baselines:
        run = runs[f"baseline-{method}"]
        encoder = EncoderFeatureExtractor.from_pretrained(run["output_dir"])
        feature_sets[f"baseline-{method}"] = cached_extract(encoder, bench, encoder_args,
                                                            run_feature_cache_name(run, encoder_args))[0]
    if args.clip_model:
        clip = ClipFeatureExtractor.from_pretrained(args.clip_model, args.resolution)
        feature_sets["baseline-clip"] = cached_extract(clip, bench, encoder_args,
                                                       feature_cache_name("baseline-clip", encoder_args))[0]

    # 4. Protocols.
    config = ProbeConfig(seed=args.seed)
    rows, details = [], {}
    for protocol in PROTOCOLS:
        new_rows, details[protocol] = rows_for_protocol(protocol, bench, feature_sets, info, config)
        rows += new_rows

    summary = runs["micdiffrep"]["summary"]
    result = {"environment": environment_info(), "command": command, "data_dir": args.data_dir,
              "num_images": len(bench.decoded), "max_images": args.max_images, "resolution": args.resolution,
              "recipe": default_recipe(),
              "unet": args.unet or PretrainingArguments.model_config_name_or_path,
              "flip_average": args.flip_average, "pooling": feature_args.pooling,
              "baseline_optimiser": baseline_optimiser(),
              "baseline_recipes": {m: BASELINE_RECIPES[m] for m in args.baselines if m in BASELINE_RECIPES},
              "num_parameters": summary["num_parameters"], "pretraining_budget_minutes": args.pretrain_minutes,
              "timesteps": list(feature_args.timesteps), "note": args.note,
              "pretraining": {name: {**info[name], "final_loss": run["summary"]["final_loss"],
                                     "calibration": {k: run["calibration"][k] for k in ("steps_per_second",
                                                                                         "images_per_second")}}
                              for name, run in runs.items()},
              "sample_grid": {"file": os.path.basename(args.output) + "_samples.png", "scheduler": "DDIM",
                              "num_inference_steps": 50},
              "results": rows, "probe_details": details}
    with open(args.output + ".json", "w") as f:
        json.dump(result, f, indent=2)
    for protocol in PROTOCOLS:
        tag = protocol.replace("->", "_to_")
        detail = details[protocol]["micdiffrep"]
        plot_accuracy_vs_timestep(detail["single_layer"], detail["msfa_per_timestep"],
                                  f"{args.output}_{tag}_accuracy_vs_timestep.png", title=f"MicDiffRep, {protocol}")
        ms = next(r for r in rows if (r["direction"] or r["protocol"]) == protocol and r["method"] == "micdiffrep-ms")
        plot_confusion_matrix(ms["confusion_matrix"], bench.label_names, f"{args.output}_{tag}_confusion_matrix.png",
                              title=f"MicDiffRep-MS, {protocol}")
    with open(args.output + ".md", "w") as f:
        f.write(markdown(result, bench.label_names))
    print(markdown(result, bench.label_names))


if __name__ == "__main__":
    run_main(main)
