"""Linear probing of a pretrained diffusion pipeline: SL sweep, MSFA, evaluation, and a transformers model folder.

    accelerate launch training/linear_probe.py --pretrained runs/pretrain \\
        --data_dir ../shared/data/brain-tumor-mri --output_dir runs/probe

`--output_dir` becomes a transformers model folder (`config.json`, `model.safetensors`, `preprocessor_config.json`,
model card) holding the frozen UNet and the MSFA head, with `results.json`, `results.md`, `accuracy_vs_timestep.png`
and `confusion_matrix.png` beside them.

Splits: the test split is `--test_data_dir`, else a `test`/`Testing` folder inside `--data_dir`, else a held-out
part carved from the data so that near-duplicate groups stay on one side (the results say which). Layers and
timesteps for MSFA and SL-best are chosen on a validation part carved the same way from the training split; the
test split is scored once, at the end.
"""

import argparse
import json
import logging
import os
from typing import List, Optional

import torch

from .feature_extraction import add_feature_args


logger = logging.getLogger(__name__)


def add_probe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    data = parser.add_argument_group("data")
    data.add_argument("--pretrained", type=str, required=True,
                      help="Pretrained pipeline folder (from pretraining), or a baseline's folder (from "
                           "training/pretrain_baseline.py, or a local CLIPVisionModel) to score it with the same probe.")
    data.add_argument("--resolution", type=int, default=None,
                      help="Image size fed to a CLIP baseline (diffusion and other baselines use their own).")
    data.add_argument("--data_dir", type=str, required=True,
                      help="Labelled images: class sub-folders, optionally inside split folders (Training/Testing, "
                           "train/val/test).")
    data.add_argument("--test_data_dir", type=str, default=None,
                      help="Labelled test images (default: the test split of --data_dir, else a carved hold-out).")
    data.add_argument("--output_dir", type=str, default="runs/probe",
                      help="Model folder to write (config, weights, processor, card, results, plots).")
    data.add_argument("--validation_split", type=float, default=0.2,
                      help="Share of the training images held out for choosing layers and timesteps.")
    data.add_argument("--test_split", type=float, default=0.2,
                      help="Share of images held out for testing when there is no test split.")
    data.add_argument("--duplicate_threshold", type=float, default=None,
                      help="Fingerprint similarity above which images are near-duplicates (default: "
                           "mic_diffrep.leakage.DEFAULT_THRESHOLD); carved splits keep such groups on one side.")
    data.add_argument("--exclude_leaked_test", action="store_true",
                      help="Score only test images without a near-duplicate in the training images (results always "
                           "report both).")
    data.add_argument("--skip_bad_images", action="store_true", help="Skip unreadable images instead of failing.")
    data.add_argument("--cache_dir", type=str, default=None, help="Decoded-image cache (default OUTPUT_DIR/.cache).")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Processes decoding images.")

    features = parser.add_argument_group("features")
    add_feature_args(features)
    features.add_argument("--noise_seed", type=int, default=0,
                          help="Seed of the fixed noise added to every image (the classifier uses the same).")

    probe = parser.add_argument_group("probe training (paper: Adam 0.01, cosine annealing, batch 128, 15 epochs)")
    probe.add_argument("--num_epochs", type=int, default=15, help="Epochs.")
    probe.add_argument("--learning_rate", type=float, default=0.01, help="Initial learning rate.")
    probe.add_argument("--train_batch_size", type=int, default=128, help="Batch size.")
    probe.add_argument("--weight_decay", type=float, default=0.0, help="Decoupled weight decay.")
    probe.add_argument("--hidden_size", type=int, default=512, help="MSFA aggregation width (eq. 5).")
    probe.add_argument("--dropout", type=float, default=0.0, help="Dropout on the aggregated features.")
    probe.add_argument("--no_standardize", action="store_true", help="Do not standardise features.")
    probe.add_argument("--seed", type=int, default=0, help="Seed of splits and probe training.")

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the model folder to the Hub.")
    hub.add_argument("--hub_model_id", type=str, default=None, help="Hub repository id.")
    hub.add_argument("--hub_token", type=str, default=None, help="Hub token.")
    hub.add_argument("--hub_private_repo", action="store_true", help="Create the repository as private.")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Linear probing (SL sweep and MSFA) of a pretrained diffusion model.")
    return add_probe_args(parser).parse_args(argv)


def _labelled(decoded, what: str):
    if decoded.labels is None:
        raise ValueError(f"{what} has no labels: linear probing needs class sub-folders (e.g. Training/glioma/*.jpg).")
    return decoded


def _align_labels(test, train_names: List[str], what: str):
    """Maps the test labels onto the training label names (by name)."""
    if test.label_names == train_names:
        return test
    unknown = sorted(set(test.label_names) - set(train_names))
    if unknown:
        raise ValueError(f"{what} has classes {unknown} that the training images do not have ({train_names}).")
    mapping = torch.tensor([train_names.index(name) for name in test.label_names])
    test.labels, test.label_names = mapping[test.labels], list(train_names)
    return test


def load_splits(args, preprocessing, accelerator):
    """Decoded training and test images, and a sentence saying where the test split came from."""
    from .data import decode_images, load_image_folder, select_splits
    from .leakage import DEFAULT_THRESHOLD, duplicate_groups, fingerprint_images, group_stratified_split

    cache_dir = args.cache_dir or os.path.join(args.output_dir, ".cache")

    def decode(dataset):
        with accelerator.main_process_first():
            return decode_images(dataset, preprocessing, skip_bad_images=args.skip_bad_images,
                                 num_workers=args.dataloader_num_workers, cache_dir=cache_dir,
                                 show_progress=accelerator.is_local_main_process)

    splits = load_image_folder(args.data_dir)
    train_splits = [s for s in splits if s != "test"]
    if args.test_data_dir:
        _, train_set = select_splits(splits, train_splits)
        _, test_set = select_splits(load_image_folder(args.test_data_dir), ["all"], "--test_data_dir")
        train = _labelled(decode(train_set), args.data_dir)
        test = _align_labels(_labelled(decode(test_set), args.test_data_dir), train.label_names, args.test_data_dir)
        return train, test, f"--test_data_dir {args.test_data_dir}"
    if "test" in splits and train_splits:
        _, train_set = select_splits(splits, train_splits)
        train = _labelled(decode(train_set), args.data_dir)
        test = _align_labels(_labelled(decode(splits["test"]), args.data_dir), train.label_names, args.data_dir)
        return train, test, f"the test split of {args.data_dir}"
    everything = _labelled(decode(select_splits(splits, ["all"])[1]), args.data_dir)
    threshold = args.duplicate_threshold or DEFAULT_THRESHOLD
    groups = duplicate_groups(fingerprint_images(everything.pixels), threshold)
    train_idx, test_idx = group_stratified_split(everything.labels, groups, args.test_split, seed=args.seed)
    source = (f"carved from {args.data_dir}: {len(test_idx)} of {len(everything)} images ({args.test_split:.0%} target), "
              f"stratified by class, near-duplicate groups (fingerprint similarity >= {threshold}) kept on one side")
    return everything.subset(train_idx), everything.subset(test_idx), source


def cached_features(pipeline, decoded, args, accelerator, name: str):
    """Features of `decoded` from the cache in OUTPUT_DIR/features, recomputed when missing or stale."""
    from .feature_cache import StaleFeatureCacheError, extraction_settings, load_features, save_features
    from .feature_extraction import extract_sharded, noise_seeds_for

    layers = args.layers or pipeline.layer_names
    settings = extraction_settings(pipeline, args.timesteps, layers, args.pooling, args.pooling_grid_size,
                                   args.num_noise_samples, {"noise": "fixed", "seed": args.noise_seed},
                                   args.mixed_precision)
    path = os.path.join(args.output_dir, "features", f"{name}.safetensors")
    if os.path.isfile(path):
        try:
            cached = load_features(path, expected_settings=settings, expected_image_ids=decoded.paths)
            logger.info("Using cached %s features from %s", name, path)
            return cached.features
        except StaleFeatureCacheError as error:
            logger.warning("%s Recomputing.", error)
    output = extract_sharded(pipeline, decoded.pixels, accelerator, noise_seeds_for(len(decoded), "fixed",
                             args.noise_seed), timesteps=args.timesteps, layers=layers, pooling=args.pooling,
                             pooling_grid_size=args.pooling_grid_size, num_noise_samples=args.num_noise_samples,
                             batch_size=args.batch_size)
    if accelerator.is_main_process:
        save_features(path, output, settings, decoded.paths, decoded.labels, decoded.label_names,
                      source_model=os.path.abspath(args.pretrained))
    return output.features


def build_classifier(pipeline, probe, layers, timesteps, label_names, args):
    """A `MicDiffRepForImageClassification` holding the pipeline's UNet and the trained MSFA head."""
    from .configuration_mic_diffrep import MicDiffRepConfig
    from .modeling_mic_diffrep import MicDiffRepForImageClassification

    scheduler = pipeline.scheduler.config
    config = MicDiffRepConfig(
        unet_config=dict(pipeline.unet.config), num_train_timesteps=scheduler.num_train_timesteps,
        beta_schedule=scheduler.beta_schedule, beta_start=scheduler.beta_start, beta_end=scheduler.beta_end,
        layers=list(layers), timesteps=list(timesteps), pooling=args.pooling,
        pooling_grid_size=args.pooling_grid_size, num_noise_samples=args.num_noise_samples,
        noise_seed=args.noise_seed, hidden_size=args.hidden_size, classifier_dropout=args.dropout,
        resize_mode=pipeline.config.resize_mode, intensity_window=pipeline.config.intensity_window,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)), label2id={name: i for i, name in enumerate(label_names)},
    )
    model = MicDiffRepForImageClassification(config)
    model.unet.load_state_dict(pipeline.unet.state_dict())
    model.head.load_state_dict(probe.head.state_dict())
    model.feature_mean.copy_(probe.mean)
    model.feature_std.copy_(probe.std)
    return model.eval()


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
        f"Images: {results['num_train']} train, {results['num_validation']} validation (carved from the training "
        f"split, near-duplicate groups kept on one side), {results['num_test']} test; "
        f"{results['leakage']['num_near']} test images have a near-duplicate in the training images.", "",
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
                     f"{row['test']['all']['macro_f1']:.3f} | {'n/a' if dedup is None else f'{dedup:.3f}'} |")
    names = results["label_names"]
    lines += ["", "Per-class recall (test):", "", "| method | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for name, row in ((ms_name, msfa), (sl_name, sl)):
        recall = row["test"]["all"]["per_class_recall"]
        lines.append(f"| {name} | " + " | ".join(f"{recall[n]:.3f}" for n in names) + " |")
    lines += ["", "Single-layer probes, test accuracy (SL-best is chosen on validation accuracy):", "",
              "| layer | " + " | ".join(f"t={t}" for t in timesteps) + " |", "|---|" + "---|" * len(timesteps)]
    for layer in layers:
        lines.append(f"| {layer} | " + " | ".join(f"{table[(layer, t)]['test_accuracy']:.3f}" for t in timesteps) + " |")
    curve = {r["timestep"]: r["test_accuracy"] for r in results["msfa_per_timestep"]}
    lines.append("| MSFA (all layers) | " + " | ".join(f"{curve[t]:.3f}" for t in timesteps) + " |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> dict:
    import sys

    from .hub import push_to_hub, write_model_card
    from .image_processing_mic_diffrep import MicDiffRepImageProcessor
    from .leakage import DEFAULT_THRESHOLD, check_leakage, duplicate_groups, fingerprint_images, group_stratified_split
    from .feature_extraction import load_pipeline
    from .pipelines import DiffusionFeaturePipeline
    from .plotting import plot_accuracy_vs_timestep, plot_confusion_matrix
    from .probing import ProbeConfig, run_probes
    from .utils import create_accelerator, environment_info, precision_dtype

    if not 0 < args.validation_split < 1 or not 0 < args.test_split < 1:
        raise ValueError("--validation_split and --test_split must be in (0, 1).")
    config = ProbeConfig(num_epochs=args.num_epochs, learning_rate=args.learning_rate,
                         train_batch_size=args.train_batch_size, weight_decay=args.weight_decay,
                         hidden_size=args.hidden_size, dropout=args.dropout, standardize=not args.no_standardize,
                         seed=args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    accelerator = create_accelerator()
    pipeline = load_pipeline(args.pretrained, args.resolution).to(accelerator.device)
    pipeline.to(precision_dtype(args.mixed_precision, accelerator.device))
    pipeline.set_progress_bar_config(disable=not accelerator.is_local_main_process, desc="Extracting features")
    is_diffusion = isinstance(pipeline, DiffusionFeaturePipeline)
    if not is_diffusion:
        args.timesteps = [0]  # a baseline encoder has no noise level
    layers = args.layers or pipeline.layer_names
    pipeline.check_inputs(args.timesteps, layers, args.pooling, args.num_noise_samples, args.batch_size)

    train, test, test_source = load_splits(args, pipeline.preprocessing, accelerator)
    untrained = sorted({train.label_names[i] for i in test.labels.unique().tolist()} -
                       {train.label_names[i] for i in train.labels.unique().tolist()})
    if untrained:
        raise ValueError(f"Test images of class(es) {untrained} have no training images: a probe cannot learn them. "
                         f"Add training images of these classes or remove them from the test data.")
    threshold = args.duplicate_threshold or DEFAULT_THRESHOLD
    groups = duplicate_groups(fingerprint_images(train.pixels), threshold)
    _, validation_idx = group_stratified_split(train.labels, groups, args.validation_split, seed=args.seed)
    validation_mask = torch.zeros(len(train), dtype=torch.bool)
    validation_mask[torch.as_tensor(validation_idx, dtype=torch.long)] = True
    leakage = check_leakage(train, test, threshold)
    leaked = torch.zeros(len(test), dtype=torch.bool)
    leaked[torch.as_tensor(leakage.leaked_test_indices, dtype=torch.long)] = True
    logger.info("%d of %d test images have a near-duplicate in the training images", int(leaked.sum()), len(test))

    train_features = cached_features(pipeline, train, args, accelerator, "train")
    test_features = cached_features(pipeline, test, args, accelerator, "test")
    test_labels = test.labels
    subsets = {"deduplicated": ~leaked}
    if args.exclude_leaked_test:
        if leaked.all():
            raise ValueError("--exclude_leaked_test: every test image has a near-duplicate in the training images.")
        test_features = {key: value[~leaked] for key, value in test_features.items()}
        test_labels, subsets = test_labels[~leaked], {}
        test_source += "; test images with a near-duplicate in the training images excluded"

    results, probes = run_probes(train_features, train.labels, test_features, test_labels, train.label_names,
                                 validation_mask, config, layers, args.timesteps, test_subsets=subsets)
    results.update({
        "method": "micdiffrep" if is_diffusion else (f"baseline-{pipeline.config.method}"
                                                     if hasattr(pipeline.config, "method") else "baseline-clip"),
        "command": " ".join(sys.argv), "environment": environment_info(), "pretrained": args.pretrained,
        "data_dir": args.data_dir, "test_split": test_source,
        "leakage": {k: v for k, v in leakage.to_dict().items() if k not in ("pairs", "leaked_test_indices")},
        "skipped_images": train.skipped + test.skipped,
        "features": {"pooling": args.pooling, "pooling_grid_size": args.pooling_grid_size,
                     "num_noise_samples": args.num_noise_samples, "noise_seed": args.noise_seed,
                     "resolution": pipeline.resolution},
    })
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as f:
            f.write(results_markdown(results))
        plot_accuracy_vs_timestep(results["single_layer"], results["msfa_per_timestep"],
                                  os.path.join(args.output_dir, "accuracy_vs_timestep.png"))
        plot_confusion_matrix(results["msfa"]["test"]["all"]["confusion_matrix"], train.label_names,
                              os.path.join(args.output_dir, "confusion_matrix.png"),
                              title="MicDiffRep-MS, test split")
        if is_diffusion:  # the transformers model folder holds a UNet; baselines get results only
            model = build_classifier(pipeline, probes["msfa"], results["msfa"]["layers"],
                                     results["msfa"]["timesteps"], train.label_names, args)
            model.save_pretrained(args.output_dir)
            MicDiffRepImageProcessor(resolution=pipeline.resolution, resize_mode=pipeline.config.resize_mode,
                                     intensity_window=pipeline.config.intensity_window).save_pretrained(args.output_dir)
            write_model_card(args.output_dir, results)
        msfa, sl = results["msfa"]["test"]["all"], results["sl_best"]["test"]["all"]
        logger.info("MicDiffRep-MS test accuracy %.3f (macro F1 %.3f); SL-best (%s, t=%d) %.3f", msfa["accuracy"],
                    msfa["macro_f1"], results["sl_best"]["layer"], results["sl_best"]["timestep"], sl["accuracy"])
        if args.push_to_hub and is_diffusion:
            push_to_hub(args.output_dir, args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
                        token=args.hub_token, private=args.hub_private_repo)
    accelerator.wait_for_everyone()
    return results
