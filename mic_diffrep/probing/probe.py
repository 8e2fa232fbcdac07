"""Linear probing of a frozen model: SL sweep, MSFA, evaluation, and a transformers model folder.

    accelerate launch training/linear_probe.py --pretrained runs/pretrain --data_dir DATA_DIR --output_dir runs/probe

`output_dir` becomes a transformers model folder (`config.json`, `model.safetensors`, `preprocessor_config.json`,
model card) holding the frozen UNet and the MSFA head, with `results.json`, `results.md`, `accuracy_vs_timestep.png`
and `confusion_matrix.png` beside them (baseline encoders get the results only).

Splits: the test split is `--test_data_dir`, else a `test`/`Testing` folder inside `--data_dir`, else a held-out
part carved from the data so that near-duplicate groups stay on one side (the results say which). Layers and
timesteps for MSFA and SL-best are chosen on a validation part carved the same way from the training split; the
test split is scored once, at the end.

```python
>>> from mic_diffrep.probing import ProbeArguments, run_probe
>>> results = run_probe(ProbeArguments(pretrained="runs/pretrain", data_dir="DATA_DIR", timesteps=[10, 100]))  # doctest: +SKIP

```
"""

import logging
import os
import shutil
import tempfile
from dataclasses import replace
from typing import Dict, Optional, Tuple

import torch

from ..data import TEST_IMAGES_FILE, DecodedImages, write_image_list
from ..data.decoding import merge_skipped
from ..features import (FeatureExtractor, StaleFeatureCacheError, extract_sharded, inherit_pretrained_slices,
                        launch_precision, load_feature_extractor, load_features, pixels_fingerprint,
                        prepare_extractor, remove_parts, save_features)
from ..reporting.hub import create_hub_repo, default_repo_id, published_pipeline, push_to_hub
from ..utils import (check_card_replaceable, command_line, create_accelerator, environment_info, hub_commit,
                     model_source, output_folder, precision_name)
from .arguments import ProbeArguments
from .export import check_new_probe, remove_earlier_probe, write_model_folder, write_results
from .heads import ProbeConfig
from .selection import run_probes
from .splits import load_probe_splits, test_images_seen_in_pretraining


logger = logging.getLogger(__name__)


def cached_features(extractor: FeatureExtractor, decoded: DecodedImages, args: ProbeArguments, accelerator,
                    name: str, mirrored: bool = False) -> Dict[Tuple[str, int], torch.Tensor]:
    """Features of `decoded` (the classifier's fixed noise), or of its mirror images with `mirrored`, from the cache
    in OUTPUT_DIR/features, recomputed when missing or stale (another model, other settings or other pixels); a
    cache of more layers or timesteps serves fewer."""
    if mirrored:
        decoded, name = decoded.mirrored(), name + "-mirrored"
    settings = {**extractor.cache_settings(args), "noise": "fixed", **({"mirrored": True} if mirrored else {}),
                "pixels": pixels_fingerprint(decoded.pixels)}  # a replaced file or other slices: other pixels
    path = os.path.join(args.output_dir, "features", f"{name}.safetensors")
    if os.path.isfile(path):
        try:
            cached = load_features(path, expected_settings=settings, expected_image_ids=decoded.paths)
            logger.info("Using cached %s features from %s", name, path)
            return cached.features
        except StaleFeatureCacheError as error:
            logger.warning("%s Recomputing.", error)
    noise_seeds = torch.full((len(decoded),), args.noise_seed, dtype=torch.long)
    parts_dir = f"{path}.parts"  # a stopped probe continues its extraction from these
    features = extract_sharded(extractor, decoded.pixels, args, accelerator, noise_seeds, parts_dir, settings)
    if accelerator.is_main_process:
        save_features(path, features, settings, decoded.paths, decoded.labels, decoded.label_names,
                      source_model=model_source(args.pretrained))
        remove_parts(parts_dir)
    return features


def run_probe(args: ProbeArguments, extractor: Optional[FeatureExtractor] = None) -> dict:
    """The SL sweep and MSFA of `args.pretrained` (or of `extractor`, which runs in its own precision unless
    `args.mixed_precision` says otherwise), written to `args.output_dir`; returns the results (also in
    `results.json`)."""
    with output_folder(args.output_dir, kind="model", data_folders=(args.data_dir, args.test_data_dir)):
        return _run_probe(args, extractor)


def _run_probe(args: ProbeArguments, extractor: Optional[FeatureExtractor]) -> dict:
    config = ProbeConfig(num_epochs=args.num_epochs, learning_rate=args.learning_rate,
                         train_batch_size=args.train_batch_size, weight_decay=args.weight_decay,
                         hidden_size=args.hidden_size, dropout=args.classifier_dropout, standardize=not args.no_standardize,
                         random_flip=args.random_flip, seed=args.seed)
    replacing = check_new_probe(args.output_dir, args.overwrite_output_dir)  # before any work
    accelerator = create_accelerator()
    if extractor is not None and args.mixed_precision is None:  # a given extractor runs in its own precision
        args = replace(args, mixed_precision=precision_name(extractor.dtype))
    args = launch_precision(args, accelerator)
    extractor = extractor or load_feature_extractor(args.pretrained, args.resolution, args.revision)
    if extractor.exportable:  # its model card would replace a README.md of the user's own (a baseline writes none)
        check_card_replaceable(args.output_dir)
    if args.push_to_hub:  # checked before the work, not after it
        if not extractor.exportable:
            raise ValueError(f"--push_to_hub: {args.pretrained} is a {extractor.name} folder, which is scored only; "
                             f"a classifier folder to upload is made from a diffusion pipeline.")
        if accelerator.is_main_process:
            args = replace(args, hub_model_id=create_hub_repo(
                default_repo_id(args.output_dir, args.hub_model_id), args.hub_token, args.hub_private_repo))
    extractor = prepare_extractor(extractor, args, accelerator)
    args = inherit_pretrained_slices(extractor.resolve(args), extractor)

    splits = load_probe_splits(args, extractor.preprocessing, accelerator)
    train, test = splits.train, splits.test
    train_features = cached_features(extractor, train, args, accelerator, "train")
    test_features = cached_features(extractor, test, args, accelerator, "test")
    train_mirrored = cached_features(extractor, train, args, accelerator, "train", mirrored=True) \
        if args.random_flip else None
    test_labels, test_source = test.labels, splits.test_source
    seen = test_images_seen_in_pretraining(args.pretrained, test.paths)
    if seen:
        logger.warning("%d of the %d test images were pretraining images of %s (unlabelled): its features have seen "
                       "them. Pretrain leaving them out (`mic-diffrep pretrain --exclude_image_list "
                       "MODEL/test_images.txt`), or use `mic-diffrep run`, which does.", seen, len(test), args.pretrained)
    subsets = {"deduplicated": ~splits.leaked}
    if args.exclude_leaked_test:
        if splits.leaked.all():
            raise ValueError("`exclude_leaked_test`: every test image has a near-duplicate in the training images.")
        test_features = {key: value[~splits.leaked] for key, value in test_features.items()}
        test_labels, subsets = test_labels[~splits.leaked], {}
        test_source += "; test images with a near-duplicate in the training images excluded"

    results, probes = run_probes(train_features, train.labels, test_features, test_labels, train.label_names,
                                 splits.validation_mask, config, args.layers, args.timesteps, test_subsets=subsets,
                                 train_features_mirrored=train_mirrored)
    results.update({
        "method": extractor.name, "command": command_line(), "environment": environment_info(),
        "pretrained": args.pretrained, "data_dir": os.path.abspath(args.data_dir),
        # the commit read, when --pretrained is a Hub repository (its --revision, or main, resolved)
        "pretrained_revision": hub_commit(getattr(extractor, "folder", None)),
        # the pipeline's Hub repository, which the model card links to (a Hub id, or where the folder was uploaded)
        "base_model": published_pipeline(args.pretrained) if extractor.exportable and args.pretrained else None,
        "test_data_dir": args.test_data_dir and os.path.abspath(args.test_data_dir), "test_split": test_source,
        "validation_split": splits.validation_source, "split_seed": args.split_seed,
        "class_warnings": splits.class_warnings,
        "test_images_seen_in_pretraining": seen,  # None: not known (no pretraining summary, or its data gone)
        "leakage": splits.leakage, "skipped_images": merge_skipped(train, test),
        "features": {"pooling": args.pooling, "pooling_grid_size": args.pooling_grid_size,
                     "num_noise_samples": args.num_noise_samples, "flip_average": args.flip_average,
                     "noise_seed": args.noise_seed,
                     "resolution": extractor.preprocessing.resolution},
    })
    if accelerator.is_main_process:
        # Written into a staging folder first, then moved in: a probe stopped while writing (Ctrl-C, a full disk)
        # leaves the earlier probe whole, not half of each
        staging = tempfile.mkdtemp(dir=args.output_dir, prefix=".tmp-probe-")
        try:
            write_results(staging, results, train.label_names)
            scored = [path for path, leaked in zip(test.paths, splits.leaked.tolist())
                      if not (leaked and args.exclude_leaked_test)]
            write_image_list(os.path.join(staging, TEST_IMAGES_FILE), scored, args.test_data_dir or args.data_dir,
                             f"The {len(scored)} test images of this probe, relative to the folder they came from: "
                             f"mic-diffrep evaluate --model MODEL --data_dir FOLDER --image_list "
                             f"MODEL/{TEST_IMAGES_FILE}")
            exported = write_model_folder(extractor, probes["msfa"], results, train.label_names, args, staging)
            if replacing:  # --overwrite_output_dir: the earlier probe is replaced once the new one is written
                remove_earlier_probe(args.output_dir)
            for name in os.listdir(staging):
                os.replace(os.path.join(staging, name), os.path.join(args.output_dir, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if exported and args.push_to_hub:
            push_to_hub(args.output_dir, args.hub_model_id, token=args.hub_token, create_repo=False)
        msfa, sl = results["msfa"]["test"]["all"], results["sl_best"]["test"]["all"]
        where = results["sl_best"]["layer"] + (f", t={results['sl_best']['timestep']}"
                                               if extractor.name == "micdiffrep" else "")
        logger.info("MSFA test accuracy %.3f (macro F1 %.3f); SL-best (%s) %.3f", msfa["accuracy"],
                    msfa["macro_f1"], where, sl["accuracy"])
    accelerator.wait_for_everyone()
    return results
