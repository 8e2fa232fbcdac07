#!/usr/bin/env python
"""MicDiffRep on real brain MRI, under two protocols that do not reward memorising duplicates.

    python benchmarks/brain_tumor_mri.py --data_dir ../shared/data/brain-tumor-mri --pretrain_minutes 45

Writes `benchmarks/results/brain_tumor_mri.{json,md}` and PNGs beside them.

1. Pretraining: the default 4.3M-parameter UNet at 64 px, bf16, on all 5,708 unlabelled images of `Training/`, for a
   fixed wall-clock budget on this machine (`training/pretrain.py` with `--time_budget_minutes`).
2. Features: every block at several timesteps, pooled on a 2x2 grid in one pass (global-average features are the
   mean of the four cells), for the pretrained UNet and for a random-init UNet of the same config.
3. Probes (paper protocol, `mic_diffrep.probing.run_probes`: layers and timesteps chosen on a validation split carved
   from the training side, near-duplicate groups kept on one side; test scored once):
   - cross-source (headline): train on one source of `sources.csv`, test on the other, both directions. The
     sources share many mirrored and re-encoded copies of the same slices, so accuracy is also reported on the
     test images with no near-duplicate in the training source ("de-duplicated").
   - in-split: a stratified 80/20 split of all images keeping near-duplicate groups (`mic_diffrep.leakage`,
     mirror-aware, threshold 0.975) on one side.
   Rows: micdiffrep-ms, micdiffrep-sl-best, random-unet-ms, pixels-logreg (a linear probe on standardised raw
   pixels, same optimiser), pixels-1nn (nearest training image by Euclidean distance on raw pixels).
4. Throughput against a plain fp32 diffusers loop in the shape of `train_unconditional.py` (JPEGs decoded and
   transformed on the fly, no autocast), and against naive feature extraction (decode on the fly, fp32, one UNet
   forward per block), as ratios.
"""

import argparse
import csv
import json
import logging
import os
import shutil
import sys
import time

import numpy as np
import PIL.Image
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mic_diffrep import DiffusionFeaturePipeline  # noqa: E402
from mic_diffrep.data import decode_images, load_image_folder  # noqa: E402
from mic_diffrep.feature_extraction import noise_seeds_for  # noqa: E402
from mic_diffrep.leakage import (DEFAULT_THRESHOLD, check_leakage, duplicate_groups, exact_keys,  # noqa: E402
                                 fingerprint_images, group_stratified_split)
from mic_diffrep.metrics import classification_report  # noqa: E402
from mic_diffrep.plotting import plot_accuracy_vs_timestep, plot_confusion_matrix  # noqa: E402
from mic_diffrep.preprocessing import image_to_pixels, pixels_to_model_input  # noqa: E402
from mic_diffrep.probing import ProbeConfig, run_probes, train_heads  # noqa: E402
from mic_diffrep.unet import create_scheduler, create_unet  # noqa: E402
from mic_diffrep.utils import environment_info  # noqa: E402


logger = logging.getLogger("benchmark")
CALIBRATION_STEPS = (10, 60)  # baseline steps timed to plan each baseline's schedule over the budget


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.path.join(REPO, "..", "shared", "data", "brain-tumor-mri"))
    parser.add_argument("--work_dir", default=os.path.join(REPO, "runs", "benchmark"), help="Models and caches.")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "brain_tumor_mri"))
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--pretrain_minutes", type=float, default=45.0, help="Wall-clock pretraining budget.")
    parser.add_argument("--pretrain_images_per_second", type=float, default=25.0,
                        help="Expected throughput, to lay the linear learning-rate decay over the budget.")
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[10, 50, 100, 200, 400])
    parser.add_argument("--probe_epochs", type=int, default=15)
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--throughput_minutes", type=float, default=1.5, help="Time for each throughput measurement.")
    parser.add_argument("--max_images", type=int, default=None, help="Use a subset (smoke runs only).")
    parser.add_argument("--baselines", nargs="*", default=[], choices=["mae", "mocov2", "byol"],
                        help="Also pretrain these baselines (training/pretrain_baseline.py), each for the same "
                             "wall-clock budget, and score them with the same probe.")
    parser.add_argument("--clip_model", default=None,
                        help="A local CLIPVisionModel folder to score as well (nothing is downloaded).")
    parser.add_argument("--sampling_steps", type=int, default=250, help="DDPM steps for the sample grid.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------


def load_data(args):
    dataset = load_image_folder(os.path.join(args.data_dir, "Training"))["train"]
    decoded = decode_images(dataset, args.resolution, cache_dir=os.path.join(args.work_dir, "decoded"))
    with open(os.path.join(args.data_dir, "sources.csv"), newline="") as f:
        source_of = {row["file"]: row["source"] for row in csv.DictReader(f)}
    sources = np.array([source_of[os.path.relpath(p, args.data_dir)] for p in decoded.paths])
    if args.max_images:
        keep = np.random.default_rng(args.seed).permutation(len(decoded))[: args.max_images]
        keep.sort()
        decoded, sources = decoded.subset(keep.tolist()), sources[keep]
    return decoded, sources


# ------------------------------------------------------------------------------------------------------------------
# Pretraining and features
# ------------------------------------------------------------------------------------------------------------------


def pretrain(args, pretrain_dir):
    from mic_diffrep.pretraining import main, parse_args as pretrain_args

    summary_file = os.path.join(pretrain_dir, "pretraining_summary.json")
    if os.path.isfile(summary_file):
        logger.info("Reusing the pretrained pipeline in %s", pretrain_dir)
        with open(summary_file) as f:
            return json.load(f)
    steps = int(args.pretrain_minutes * 60 * args.pretrain_images_per_second / 32)
    argv = [
        "--train_data_dir", os.path.join(args.data_dir, "Training"), "--output_dir", pretrain_dir,
        "--resolution", str(args.resolution), "--mixed_precision", "bf16", "--train_batch_size", "32",
        "--learning_rate", str(args.learning_rate), "--lr_warmup_steps", "100", "--max_train_steps", str(steps),
        "--time_budget_minutes", str(args.pretrain_minutes), "--save_images_epochs", "100000",
        "--save_model_epochs", "100000", "--checkpointing_steps", "1000", "--checkpoints_total_limit", "1",
        "--eval_batch_size", "16", "--ddpm_num_inference_steps", str(args.sampling_steps), "--seed", str(args.seed),
        "--logger", "tensorboard", "--cache_dir", os.path.join(args.work_dir, "decoded"),
    ]
    logger.info("Pretraining: training/pretrain.py %s", " ".join(argv))
    return main(pretrain_args(argv))


def pretrain_baseline(args, method):
    from mic_diffrep.baseline_pretraining import main, parse_args as baseline_args

    output_dir = os.path.join(args.work_dir, f"baseline-{method}")
    summary_file = os.path.join(output_dir, "pretraining_summary.json")
    if os.path.isfile(summary_file):
        with open(summary_file) as f:
            return output_dir, json.load(f)

    def run(output_dir, steps, minutes):
        argv = ["--method", method, "--train_data_dir", os.path.join(args.data_dir, "Training"), "--output_dir",
                output_dir, "--resolution", str(args.resolution), "--mixed_precision", "bf16", "--max_train_steps",
                str(steps), "--time_budget_minutes", str(minutes), "--checkpointing_steps", "1000",
                "--checkpoints_total_limit", "1", "--seed", str(args.seed), "--logger", "none",
                "--cache_dir", os.path.join(args.work_dir, "decoded")]
        logger.info("Pretraining %s: training/pretrain_baseline.py %s", method, " ".join(argv))
        return main(baseline_args(argv))

    # The methods run at very different speeds (MAE is ~10x faster than the UNet): measure this one's throughput on
    # short runs first, so that its cosine decay spans the whole wall-clock budget instead of ending early. The
    # difference of two runs leaves out the slow first steps (kernel warm-up), which would underestimate it.
    seconds = []
    for steps in CALIBRATION_STEPS:
        calibration_dir = f"{output_dir}-calibration-{steps}"
        seconds.append(60 * run(calibration_dir, steps, args.pretrain_minutes)["train_minutes"])
        shutil.rmtree(calibration_dir)
    steps_per_second = (CALIBRATION_STEPS[1] - CALIBRATION_STEPS[0]) / max(seconds[1] - seconds[0], 1e-3)
    logger.info("%s: %.2f steps/s measured before pretraining", method, steps_per_second)
    steps = max(1, int(args.pretrain_minutes * 60 * steps_per_second))
    return output_dir, run(output_dir, steps, args.pretrain_minutes)


def extract(pipeline, decoded, args, name, timesteps=None, pooling="grid"):
    """Grid-pooled (2x2) features of every block and timestep (baseline encoders: pooled encoder output); cached."""
    from mic_diffrep.feature_cache import extraction_settings, load_features, save_features, StaleFeatureCacheError

    timesteps = timesteps or args.timesteps
    settings = extraction_settings(pipeline, timesteps, None, pooling, 2, 1, {"noise": "fixed", "seed": 0}, "bf16")
    path = os.path.join(args.work_dir, f"features-{name}.safetensors")
    speed_file = path.replace(".safetensors", "-speed.json")
    if os.path.isfile(path) and os.path.isfile(speed_file):
        try:
            with open(speed_file) as f:
                return load_features(path, settings, decoded.paths).features, json.load(f)["images_per_second"]
        except StaleFeatureCacheError as error:
            logger.warning("%s", error)
    start = time.perf_counter()
    output = pipeline.extract_features(decoded.pixels, timesteps=timesteps, pooling=pooling, pooling_grid_size=2,
                                       noise_seeds=noise_seeds_for(len(decoded), "fixed", 0), batch_size=128,
                                       mixed_precision="bf16")
    seconds = time.perf_counter() - start
    save_features(path, output, settings, decoded.paths, decoded.labels, decoded.label_names)
    with open(speed_file, "w") as f:
        json.dump({"images_per_second": len(decoded) / seconds}, f)
    return output.features, len(decoded) / seconds


def global_average(grid_features):
    """Global-average features from 2x2 grid features: the mean of the four cells (cells are equal-sized)."""
    return {key: value.view(value.shape[0], -1, 4).mean(dim=-1) for key, value in grid_features.items()}


# ------------------------------------------------------------------------------------------------------------------
# Baselines on raw pixels
# ------------------------------------------------------------------------------------------------------------------


def pixels_logreg(train_pixels, train_labels, test_pixels, config, num_labels):
    features = {("pixels", 0): pixels_to_model_input(train_pixels).flatten(1)}
    probe = train_heads(features, train_labels, num_labels, config, hidden_size=0)[("pixels", 0)]
    return probe.predict(pixels_to_model_input(test_pixels).flatten(1))


def pixels_1nn(train_pixels, train_labels, test_pixels):
    train = pixels_to_model_input(train_pixels).flatten(1)
    test = pixels_to_model_input(test_pixels).flatten(1)
    predictions = []
    for start in range(0, len(test), 512):
        distances = torch.cdist(test[start : start + 512], train)
        predictions.append(train_labels[distances.argmin(dim=1)])
    return torch.cat(predictions)


# ------------------------------------------------------------------------------------------------------------------
# Protocols
# ------------------------------------------------------------------------------------------------------------------


def evaluate_protocol(name, direction, train_idx, test_idx, decoded, feature_sets, groups, args, pretrain_info,
                      extraction_speed):
    """All rows of one train/test split."""
    label_names = decoded.label_names
    labels = decoded.labels
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    train_labels, test_labels = labels[train_idx], labels[test_idx]
    _, validation = group_stratified_split(train_labels, groups[train_idx.numpy()], 0.2, seed=args.seed)
    validation_mask = torch.zeros(len(train_idx), dtype=torch.bool)
    validation_mask[torch.as_tensor(validation, dtype=torch.long)] = True
    leakage = check_leakage(decoded.subset(train_idx.tolist()), decoded.subset(test_idx.tolist()))
    clean = torch.ones(len(test_idx), dtype=torch.bool)
    clean[torch.as_tensor(leakage.leaked_test_indices, dtype=torch.long)] = False
    subsets = {"deduplicated": clean}
    config = ProbeConfig(num_epochs=args.probe_epochs, hidden_size=args.hidden_size, seed=args.seed)
    common = {"protocol": name, "direction": direction, "num_train": len(train_idx), "num_test": len(test_idx),
              "num_test_deduplicated": int(clean.sum()), "test_images_with_near_duplicate_in_train": leakage.num_near}

    def row(method, report_by_subset, **extra):
        full = report_by_subset["all"]
        dedup = report_by_subset.get("deduplicated")
        return {**common, "method": method, "accuracy": full["accuracy"], "macro_f1": full["macro_f1"],
                "per_class_recall": full["per_class_recall"], "confusion_matrix": full["confusion_matrix"],
                "accuracy_deduplicated": dedup["accuracy"] if dedup else None,
                "macro_f1_deduplicated": dedup["macro_f1"] if dedup else None, **extra}

    def reports(predictions):
        return {k: classification_report(predictions[m].tolist(), test_labels[m].tolist(), label_names)
                for k, m in {"all": torch.ones_like(clean), **subsets}.items() if m.any()}

    rows, details = [], {}
    for method, features in feature_sets.items():
        layers = layer_order(features)
        timesteps = sorted({key[1] for key in features})
        train_f = {k: v[train_idx] for k, v in features.items()}
        test_f = {k: v[test_idx] for k, v in features.items()}
        results, _ = run_probes(train_f, train_labels, test_f, test_labels, label_names, validation_mask, config,
                                layers, timesteps, test_subsets=subsets)
        details[method] = results
        pooling = "grid2x2" if method.endswith("grid") else "avg"
        base = method.replace("-grid", "")
        extra = {"pooling": pooling, "pretraining_minutes": pretrain_info.get(base, {}).get("minutes"),
                 "pretraining_images_per_second": pretrain_info.get(base, {}).get("images_per_second"),
                 "feature_images_per_second": extraction_speed.get(base)}
        if base.startswith("baseline-"):  # one encoder output: the same MSFA head, and the linear probe beside it
            rows.append(row(base, results["msfa"]["test"], layers=["encoder"], timesteps=[],
                            linear_accuracy=results["sl_best"]["test"]["all"]["accuracy"], **extra))
            continue
        rows.append(row(f"{base}-ms" + ("" if pooling == "avg" else "-grid"), results["msfa"]["test"],
                        layers=results["msfa"]["layers"], timesteps=results["msfa"]["timesteps"], **extra))
        if base == "micdiffrep":
            rows.append(row("micdiffrep-sl-best" + ("" if pooling == "avg" else "-grid"), results["sl_best"]["test"],
                            layers=[results["sl_best"]["layer"]], timesteps=[results["sl_best"]["timestep"]], **extra))
    logreg = pixels_logreg(decoded.pixels[train_idx], train_labels, decoded.pixels[test_idx], config, len(label_names))
    rows.append(row("pixels-logreg", reports(logreg), pretraining_minutes=0.0))
    nn1 = pixels_1nn(decoded.pixels[train_idx], train_labels, decoded.pixels[test_idx])
    rows.append(row("pixels-1nn", reports(nn1), pretraining_minutes=0.0))
    return rows, details


def layer_order(features):
    """Block names of a feature dict in UNet execution order."""
    names = list(dict.fromkeys(key[0] for key in features))

    def order(name):  # baseline encoders have one block, "encoder"
        kind, _, index = name.partition(".")
        return ({"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(kind, 3), int(index or 0))

    return sorted(names, key=order)


# ------------------------------------------------------------------------------------------------------------------
# Throughput against plain loops
# ------------------------------------------------------------------------------------------------------------------


class _OnTheFly(torch.utils.data.Dataset):
    """train_unconditional.py's data path: open the JPEG, convert, resize, flip, normalise, every epoch."""

    def __init__(self, paths, resolution):
        self.paths, self.resolution = paths, resolution

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with PIL.Image.open(self.paths[index]) as image:
            pixels = image_to_pixels(image, self.resolution)
        if torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        return pixels_to_model_input(pixels)


def plain_training_throughput(paths, resolution, minutes):
    torch.manual_seed(0)
    unet, scheduler = create_unet(resolution), create_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    loader = torch.utils.data.DataLoader(_OnTheFly(paths, resolution), batch_size=32, shuffle=True)
    seen, start = 0, None
    while True:
        for batch in loader:
            noise = torch.randn_like(batch)
            timesteps = torch.randint(0, 1000, (len(batch),))
            loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(batch, noise, timesteps), timesteps).sample,
                                                noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if start is None:
                start = time.perf_counter()  # the first step warms up
                continue
            seen += len(batch)
            if time.perf_counter() - start > 60 * minutes:
                return seen / (time.perf_counter() - start)


@torch.no_grad()
def naive_extraction_throughput(pipeline, paths, timestep, num_images=128):
    """Decode on the fly, fp32, one UNet forward per block."""
    start = time.perf_counter()
    for path_start in range(0, num_images, 64):
        batch_paths = paths[path_start : path_start + 64]
        pixels = torch.stack([image_to_pixels(PIL.Image.open(p), pipeline.resolution) for p in batch_paths])
        for layer in pipeline.layer_names:
            pipeline.extract_features(pixels, timesteps=[timestep], layers=[layer], show_progress=False)
    return num_images / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    os.makedirs(args.work_dir, exist_ok=True)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    decoded, sources = load_data(args)
    logger.info("%d images; sources %s", len(decoded), dict(zip(*np.unique(sources, return_counts=True))))

    # 1. Pretraining, sample grid.
    pretrain_dir = os.path.join(args.work_dir, "pretrain")
    summary = pretrain(args, pretrain_dir)
    pipeline = DiffusionFeaturePipeline.from_pretrained(pretrain_dir)
    grids = sorted(os.listdir(os.path.join(pretrain_dir, "samples")))  # written by pretraining at its last epoch
    shutil.copy(os.path.join(pretrain_dir, "samples", grids[-1]), args.output + "_samples.png")

    # 2. Features of the pretrained and of a random-init UNet (same config, seed 0).
    torch.manual_seed(args.seed)
    random_pipeline = DiffusionFeaturePipeline(create_unet(args.resolution), create_scheduler())
    grid_pretrained, speed = extract(pipeline, decoded, args, "pretrained")
    grid_random, _ = extract(random_pipeline, decoded, args, "random")
    feature_sets = {"micdiffrep": global_average(grid_pretrained), "random-unet": global_average(grid_random),
                    "micdiffrep-grid": grid_pretrained}
    pretrain_info = {"micdiffrep": {"minutes": summary["train_minutes"], "images_per_second": summary["images_per_second"]},
                     "random-unet": {"minutes": 0.0, "images_per_second": None}}
    extraction_speed = {"micdiffrep": speed, "random-unet": speed}
    from mic_diffrep.baselines import BaselineFeatureExtractor, ClipFeatureExtractor

    for method in args.baselines:
        baseline_dir, baseline_summary = pretrain_baseline(args, method)
        name = f"baseline-{method}"
        feature_sets[name], extraction_speed[name] = extract(
            BaselineFeatureExtractor.from_pretrained(baseline_dir), decoded, args, name, timesteps=[0], pooling="avg")
        pretrain_info[name] = {"minutes": baseline_summary["train_minutes"],
                               "images_per_second": baseline_summary["images_per_second"]}
    if args.clip_model:
        feature_sets["baseline-clip"], extraction_speed["baseline-clip"] = extract(
            ClipFeatureExtractor.from_pretrained(args.clip_model, args.resolution), decoded, args, "baseline-clip",
            timesteps=[0], pooling="avg")
        pretrain_info["baseline-clip"] = {"minutes": None, "images_per_second": None}

    # 3. Protocols.
    groups = duplicate_groups(fingerprint_images(decoded.pixels), DEFAULT_THRESHOLD, keys=exact_keys(decoded.pixels))
    rows, details = [], {}
    for direction, train_source in (("sartaj->other", "sartaj"), ("other->sartaj", "figshare_or_br35h")):
        train_idx = np.flatnonzero(sources == train_source)
        test_idx = np.flatnonzero(sources != train_source)
        new_rows, details[direction] = evaluate_protocol("cross-source", direction, train_idx, test_idx, decoded,
                                                         feature_sets, groups, args, pretrain_info, extraction_speed)
        rows += new_rows
    train_idx, test_idx = group_stratified_split(decoded.labels, groups, 0.2, seed=args.seed)
    new_rows, details["in-split"] = evaluate_protocol("in-split", None, train_idx, test_idx, decoded, feature_sets,
                                                      groups, args, pretrain_info, extraction_speed)
    rows += new_rows

    # 4. Throughput against plain loops.
    plain = plain_training_throughput(decoded.paths, args.resolution, args.throughput_minutes)
    naive = naive_extraction_throughput(pipeline, decoded.paths, timestep=100)
    hooked = speed * len(args.timesteps)  # image-timesteps/s: one hooked forward gives every block at one timestep
    throughput = {
        "pretraining_images_per_second": summary["images_per_second"],
        "plain_fp32_loop_images_per_second": plain,
        "pretraining_speedup": summary["images_per_second"] / plain,
        "feature_images_per_second_all_blocks_all_timesteps": speed,
        "feature_image_timesteps_per_second": hooked,
        "naive_extraction_image_timesteps_per_second": naive,
        "feature_extraction_speedup": hooked / naive,
    }

    result = {"environment": environment_info(), "command": command, "data_dir": args.data_dir,
              "resolution": args.resolution, "num_parameters": summary["num_parameters"],
              "pretraining": {k: summary[k] for k in ("train_minutes", "global_step", "images_per_second",
                                                     "final_loss", "num_images", "mixed_precision")},
              "pretraining_budget_minutes": args.pretrain_minutes, "timesteps": args.timesteps,
              "sample_grid": {"file": os.path.basename(args.output) + "_samples.png", "scheduler": "DDPM",
                              "num_inference_steps": args.sampling_steps},
              "duplicate_threshold": DEFAULT_THRESHOLD, "throughput": throughput, "results": rows,
              "probe_details": details}
    with open(args.output + ".json", "w") as f:
        json.dump(result, f, indent=2)
    for direction, detail in details.items():
        tag = direction.replace("->", "_to_")
        plot_accuracy_vs_timestep(detail["micdiffrep"]["single_layer"], detail["micdiffrep"]["msfa_per_timestep"],
                                  f"{args.output}_{tag}_accuracy_vs_timestep.png", title=f"MicDiffRep, {direction}")
        ms = next(r for r in rows if (r["direction"] or r["protocol"]) == direction and r["method"] == "micdiffrep-ms")
        plot_confusion_matrix(ms["confusion_matrix"], decoded.label_names, f"{args.output}_{tag}_confusion_matrix.png",
                              title=f"MicDiffRep-MS, {direction}")
    with open(args.output + ".md", "w") as f:
        f.write(markdown(result, decoded.label_names))
    print(markdown(result, decoded.label_names))


# The paper's Table 1 (accuracy, %): quoted beside our rows, never used in any computation.
PAPER_TABLE1 = {"micdiffrep-ms": 88, "micdiffrep-sl-best": 83, "baseline-clip": 82, "baseline-byol": 77,
                "baseline-mocov2": 73, "baseline-mae": 69}
TABLE1_ROWS = [("MicDiffRep-MS", "micdiffrep-ms"), ("MicDiffRep-SL-best", "micdiffrep-sl-best"),
               ("CLIP", "baseline-clip"), ("BYOL", "baseline-byol"), ("MoCo v2", "baseline-mocov2"),
               ("MAE", "baseline-mae"), ("random-init UNet (MS)", "random-unet-ms"),
               ("raw pixels (logistic regression)", "pixels-logreg")]


def summary_table(result):
    """The paper's Table 1 under our protocols: accuracy (and dedup accuracy) of each method in each split."""
    splits = [("sartaj->other", "cross-source sartaj->other"), ("other->sartaj", "cross-source other->sartaj"),
              ("in-split", "in-split")]
    found = {((r["direction"] or r["protocol"]), r["method"]): r for r in result["results"]}
    lines = ["## The paper's Table 1 under one protocol", "",
             "Accuracy (accuracy on the de-duplicated test images in brackets). Every pretrained method had the same "
             f"wall-clock budget on this machine ({result['pretraining_budget_minutes']:g} min, bf16; actual "
             "minutes and throughput per method in the tables below) on the same unlabelled images, and the same "
             "probe. The paper's figures are its own split and budget (112 px, 200 epochs), quoted for reference.", "",
             "| method | " + " | ".join(title for _, title in splits) + " | pretraining min | paper |",
             "|---|" + "---|" * len(splits) + "---|---|"]
    for title, method in TABLE1_ROWS:
        rows = [found.get((split, method)) for split, _ in splits]
        if not any(rows):
            cells = ["not run"] * len(splits)
            minutes = "not run here (needs local weights: `--clip_model DIR`)" if method == "baseline-clip" else ""
        else:
            cells = [f"{r['accuracy']:.3f} ({r['accuracy_deduplicated']:.3f})" if r else "" for r in rows]
            minutes = next((f"{r['pretraining_minutes']:.1f}" for r in rows if r and r.get("pretraining_minutes")
                            is not None), "")
        paper = f"{PAPER_TABLE1[method] / 100:.2f}" if method in PAPER_TABLE1 else ""
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {minutes} | {paper} |")
    budget = result["pretraining_budget_minutes"]
    short = sorted({(r["method"], r["pretraining_minutes"]) for r in result["results"]
                    if r.get("pretraining_minutes") and r["pretraining_minutes"] < 0.9 * budget})
    if short:
        lines += ["", "Used less than 90% of the budget (the planned steps ran out before the wall clock): " + ", ".join(
            f"{method} {minutes:.1f} min" for method, minutes in short) + "."]
    return lines + [""]


def markdown(result, label_names):
    env, pre, tp = result["environment"], result["pretraining"], result["throughput"]
    lines = [
        "# Brain tumour MRI benchmark", "",
        f"Command: `{result['command']}`  ",
        f"Machine: {env['processor']}, {env['cpu_count']} CPUs, no GPU; torch {env['torch']}, diffusers {env['diffusers']}",
        "",
        f"Data: the 5,708 images of `Training/` in `{os.path.basename(os.path.normpath(result['data_dir']))}` "
        f"(4 classes), decoded to {result['resolution']} px grey. Pretraining: the default "
        f"{result['num_parameters'] / 1e6:.2f}M-parameter UNet on all of them, unlabelled, {pre['mixed_precision']}, "
        f"budget {result['pretraining_budget_minutes']:g} min of wall clock: {pre['global_step']} steps in "
        f"{pre['train_minutes']:.1f} min ({pre['images_per_second']:.1f} images/s), final loss {pre['final_loss']:.4f}.",
        "Probes: paper protocol (Adam 0.01, cosine, batch 128, 15 epochs), features at timesteps "
        f"{', '.join(map(str, result['timesteps']))}; MSFA layers/timesteps and SL-best chosen on a validation split "
        "carved from the training side (near-duplicate groups kept on one side); test scored once.",
        f"Near-duplicates: `mic_diffrep.leakage` fingerprints (mirror-aware, threshold {result['duplicate_threshold']}). "
        "*dedup* = accuracy on the test images with no near-duplicate among the training images.", "",
    ]
    lines += summary_table(result)
    for protocol, direction in (("cross-source", "sartaj->other"), ("cross-source", "other->sartaj"),
                                ("in-split", None)):
        rows = [r for r in result["results"] if r["protocol"] == protocol and r["direction"] == direction]
        if not rows:
            continue
        r0 = rows[0]
        title = f"{protocol}, {direction}" if direction else f"{protocol} (stratified group split, 20% test)"
        lines += [f"## {title}", "",
                  f"{r0['num_train']} train / {r0['num_test']} test images; {r0['test_images_with_near_duplicate_in_train']} "
                  f"test images have a near-duplicate in train ({r0['num_test_deduplicated']} left for *dedup*).", "",
                  "| method | accuracy | macro F1 | accuracy (dedup) | " + " | ".join(f"recall {n}" for n in label_names)
                  + " | layers @ t | pretraining min | pretraining images/s |",
                  "|---|---|---|---|" + "---|" * len(label_names) + "---|---|---|"]
        for r in rows:
            recall = " | ".join(f"{r['per_class_recall'][n]:.3f}" for n in label_names)
            where = ", ".join(r.get("layers") or [])
            if r.get("timesteps"):
                where += " @ " + ", ".join(map(str, r["timesteps"]))
            dedup = "n/a" if r["accuracy_deduplicated"] is None else f"{r['accuracy_deduplicated']:.3f}"
            minutes = "" if r.get("pretraining_minutes") is None else f"{r['pretraining_minutes']:.1f}"
            speed = "" if not r.get("pretraining_images_per_second") else f"{r['pretraining_images_per_second']:.1f}"
            lines.append(f"| {r['method']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {dedup} | {recall} | {where} | "
                         f"{minutes} | {speed} |")
        lines.append("")
    lines += ["## Targets (cross-source, MicDiffRep-MS accuracy)", "",
              "| direction | MS - pixels-logreg (>= 10 pts) | MS - random-unet-ms (>= 5 pts) | MS - SL-best (>= 3 pts) |",
              "|---|---|---|---|"]
    for direction in ("sartaj->other", "other->sartaj"):
        by_method = {r["method"]: r["accuracy"] for r in result["results"] if r["direction"] == direction}
        if "micdiffrep-ms" not in by_method:
            continue
        cells = []
        for other, target in (("pixels-logreg", 10), ("random-unet-ms", 5), ("micdiffrep-sl-best", 3)):
            gap = 100 * (by_method["micdiffrep-ms"] - by_method[other])
            cells.append(f"{gap:+.1f} ({'met' if gap >= target else 'NOT met'})")
        lines.append(f"| {direction} | " + " | ".join(cells) + " |")
    lines += ["", "## Throughput", "",
              f"- pretraining: {tp['pretraining_images_per_second']:.1f} images/s (bf16, decoded once) against "
              f"{tp['plain_fp32_loop_images_per_second']:.1f} images/s for a plain fp32 loop decoding JPEGs on the fly: "
              f"**{tp['pretraining_speedup']:.2f}x**",
              f"- feature extraction: {tp['feature_image_timesteps_per_second']:.1f} image-timesteps/s (all blocks from one "
              f"hooked bf16 forward) against {tp['naive_extraction_image_timesteps_per_second']:.1f} for decode-on-the-fly, "
              f"fp32, one forward per block: **{tp['feature_extraction_speedup']:.1f}x**", "",
              ("Baselines (`baseline-*` rows): each pretrained with `training/pretrain_baseline.py` for the same wall-clock "
               "budget and scored with the same probe (MSFA head on the pooled encoder output; `linear_accuracy` in "
               "the JSON is the linear probe)." if any(r["method"].startswith("baseline-") for r in result["results"])
               else "MAE, MoCo v2 and BYOL were not run for this table (`--baselines mae mocov2 byol` adds them)."),
              ("" if any(r["method"] == "baseline-clip" for r in result["results"]) else
               "CLIP was not run here: it needs pretrained weights, which cannot be downloaded on this machine "
               "(`--clip_model DIR` scores a local CLIPVisionModel)."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
