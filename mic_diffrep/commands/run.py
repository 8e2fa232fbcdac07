"""`mic-diffrep run`: the whole method in one command, from settings in `RUN_DEFAULTS`, a preset and flags.

pretrain -> sample grid -> features -> SL sweep + MSFA -> evaluation -> transformers model folder -> report.
"""

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import typing
import warnings
from dataclasses import fields, replace
from typing import Literal, Optional

import yaml

from ..data import (check_labelled, decode_images, images_fingerprint, label_by_class_folder, load_image_folder,
                    read_image_list, relative_image_id, select_splits, write_image_list)
from ..data.medical import add_slice_arguments
from ..features import FeatureArguments
from ..models.mic_diffrep.unet import UNET_PRESETS
from ..probing import ProbeArguments, run_probe
from ..probing.export import check_new_probe
from ..probing.splits import carved_test_ids, check_carvable, check_test_classes, own_validation_split
from ..reporting.hub import create_hub_repo, default_repo_id, push_pipeline_to_hub
from ..reporting.results import run_report_markdown
from ..training import RECIPE_KEYS, SUMMARY_FILE, PretrainingArguments, default_recipe, pretrain
from ..training.checkpointing import check_new_run
from ..training.loop import training_fingerprint, training_images
from ..utils import (MIXED_PRECISION_CHOICES, check_outside_data, check_value, command_line, is_first_process,
                     share_as_umask_allows, write_json)
from .base import DeprecatedFlag


SAMPLE_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample_data",
                               "brain-tumor-mri")

# The pretraining recipe keys take `PretrainingArguments`' defaults (the recipe chosen in the ablation study), the
# read-out keys `FeatureArguments`' defaults, so `mic-diffrep run` and `mic-diffrep pretrain` / `extract` agree.
_FEATURE_DEFAULTS = FeatureArguments()

# What `mic-diffrep run` does when given no flags: the bundled sample, 64 px, bf16 where it is fast.
RUN_DEFAULTS = {
    "data_dir": SAMPLE_DATA_DIR,
    "output_dir": "runs/mic-diffrep",
    "resolution": 64,
    "resize_mode": PretrainingArguments.resize_mode,
    "intensity_window": PretrainingArguments.intensity_window,
    "model_config_name_or_path": PretrainingArguments.model_config_name_or_path,
    "mixed_precision": "bf16",
    "pretrain_epochs": 40,
    "pretrain_batch_size": 32,
    **default_recipe(),
    "num_images": 16,
    "sample_scheduler": "ddim",
    "num_inference_steps": 50,
    "timesteps": list(_FEATURE_DEFAULTS.timesteps),
    "pooling": _FEATURE_DEFAULTS.pooling,
    "num_noise_samples": _FEATURE_DEFAULTS.num_noise_samples,
    "flip_average": _FEATURE_DEFAULTS.flip_average,
    "probe_epochs": 15,
    "probe_learning_rate": 0.01,
    "probe_batch_size": 128,
    "probe_random_flip": ProbeArguments.random_flip,
    "hidden_size": 512,
    "test_data_dir": None,
    "test_split": ProbeArguments.test_split,
    "validation_split": ProbeArguments.validation_split,
    "duplicate_threshold": None,
    "seed": 0,
    "split_seed": 0,
    "skip_bad_images": False,
    "slice_axis": 2,
    "slice_range": None,
    "keep_empty_slices": False,
}
# A long run (`--config paper`: hours) keeps its last checkpoint of every this many steps (and Ctrl-C saves one).
RUN_CHECKPOINTING_STEPS = 1000
# Settings that pretraining and the probe both take, under the same names.
_SHARED_DATA_KEYS = ("skip_bad_images", "slice_axis", "slice_range", "keep_empty_slices")

# Named presets for `--config NAME`: "paper" is the recipe the paper states (112 px, 200 epochs of DDPM pretraining
# with Adam 1e-4 and linear decay, batch 32, uniform timesteps, DDPM-1000 samples; the probe's Adam 0.01, cosine,
# batch 128, 15 epochs), with what a plain DDPM of its time would do where it says nothing (horizontal flips only, no
# EMA, fp32, the `base` UNet, average pooling); the rest keeps the package's values (README: "Recipe: this package
# against the paper", which marks the assumed ones).
RUN_PRESETS = {
    "paper": {
        "resolution": 112, "model_config_name_or_path": "base", "pretrain_epochs": 200, "pretrain_batch_size": 32,
        "learning_rate": 1e-4, "lr_scheduler": "linear", "lr_warmup_steps": 0, "unet_dropout": 0.0,
        "ddpm_beta_schedule": "linear", "max_train_timestep": None,
        "timestep_power": 1.0, "snr_gamma": None, "signal_weighting": False, "self_conditioning": False,
        "mirror_symmetric_kernels": False, "random_crop_scale": None, "intensity_jitter": False, "use_ema": False,
        "sample_scheduler": "ddpm",
        "num_inference_steps": 1000, "mixed_precision": "no", "probe_epochs": 15, "probe_learning_rate": 0.01,
        "probe_batch_size": 128, "probe_random_flip": False, "hidden_size": 512, "num_noise_samples": 1,
        "pooling": "avg", "flip_average": False,
    },
}


# Settings renamed since, by their old names: a --config file that uses one still runs, with a FutureWarning.
RENAMED_KEYS = {"num_samples": "num_images", "sampling_steps": "num_inference_steps"}


def load_config(path_or_preset: str) -> dict:
    """Settings from a preset name (`RUN_PRESETS`) or a YAML/JSON file of `RUN_DEFAULTS` keys."""
    if path_or_preset in RUN_PRESETS:
        return dict(RUN_PRESETS[path_or_preset])
    if not os.path.isfile(path_or_preset):
        raise FileNotFoundError(f"--config {path_or_preset!r} is neither a preset ({', '.join(RUN_PRESETS)}) nor a file.")
    with open(path_or_preset, encoding="utf-8") as f:
        try:
            config = yaml.safe_load(f) if path_or_preset.endswith((".yaml", ".yml")) else json.load(f)
        except (yaml.YAMLError, json.JSONDecodeError) as error:
            raise ValueError(f"--config {path_or_preset} cannot be read: {' '.join(str(error).split())}") from None
    config = config or {}
    if not isinstance(config, dict):
        raise ValueError(f"--config {path_or_preset}: expected a mapping of settings, got {type(config).__name__}.")
    for old, new in RENAMED_KEYS.items():
        if old in config:
            if new in config:
                raise ValueError(f"--config {path_or_preset}: `{old}` is the old name of `{new}`; give `{new}` only.")
            warnings.warn(f"--config {path_or_preset}: `{old}` is deprecated and will be removed: rename it "
                          f"`{new}`.", FutureWarning, stacklevel=2)
            config[new] = config.pop(old)
    unknown = sorted(set(config) - set(RUN_DEFAULTS))
    if unknown:
        raise ValueError(f"--config {path_or_preset}: unknown key(s) {unknown}; known keys are {sorted(RUN_DEFAULTS)}.")
    config = {key: _yaml_value(value, _config_annotation(key)) for key, value in config.items()}
    check_config(config, source=f"--config {path_or_preset}")
    return config


def _yaml_value(value, hint):
    """What a YAML file's value spells, for a setting of type `hint`: `1e-3` (no dot) is a string to YAML and `no`
    is `False`; a number-typed setting takes the number, a choice among 'no', ... takes 'no' (or 'yes')."""
    choices = [arg for literal in (hint, *typing.get_args(hint)) if typing.get_origin(literal) is Literal
               for arg in typing.get_args(literal)]
    if isinstance(value, bool) and ("no" if value is False else "yes") in choices:
        return "no" if value is False else "yes"
    if isinstance(value, str) and float in (hint, *typing.get_args(hint)):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# Settings of `mic-diffrep run` that are counts (at least 1).
_COUNT_KEYS = ("pretrain_epochs", "pretrain_batch_size", "num_images", "num_inference_steps", "probe_epochs",
               "probe_batch_size", "num_noise_samples", "resolution")


def _config_annotation(key: str):
    """The type of run setting `key`: that of the `PretrainingArguments` or `ProbeArguments` field of its name,
    else that of its default."""
    for settings in (PretrainingArguments, ProbeArguments):
        hints = typing.get_type_hints(settings)
        if key in hints:
            return hints[key]
    return type(RUN_DEFAULTS[key])


def check_config(config: dict, source: Optional[str] = None) -> None:
    """Checks the types, choices and counts of run settings, naming each by its flag (`--key`) or, with `source`,
    by the file it came from."""
    for key, value in config.items():
        name = f"{source}: `{key}`" if source else f"--{key}"
        check_value(name, value, _config_annotation(key))
        if key in _COUNT_KEYS and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}.")
        if key == "probe_learning_rate" and value <= 0:
            raise ValueError(f"{name} must be positive, got {value}.")
        if key == "hidden_size" and value < 0:  # 0: a linear head on the concatenated features, as the probe takes
            raise ValueError(f"{name} must be at least 0 (0: a single linear layer), got {value}.")


def check_run(config: dict, pretraining_args: PretrainingArguments, probe_args: ProbeArguments) -> Optional[list]:
    """What would otherwise fail only after pretraining: the probe's timesteps, the data's labels, whether the
    validation part (and a test split, when the data has none) can be carved from it, and a test split's classes and
    images. Returns the ids of the test images the probe will carve (the data has no test split), which pretraining
    leaves out, else `None`."""
    bad = [t for t in probe_args.timesteps if not 0 <= t < pretraining_args.ddpm_num_steps]
    if bad:
        raise ValueError(f"`timesteps` {bad}: read-out timesteps must be in [0, {pretraining_args.ddpm_num_steps}).")
    check_outside_data(config["output_dir"], (config["data_dir"], config["test_data_dir"]), "--output_dir")
    splits = load_image_folder(config["data_dir"])
    for split in splits.values():
        check_labelled(split, f"`data_dir` {config['data_dir']}",
                       "linear probing (to pretrain on unlabelled images: `mic-diffrep pretrain`)")
    # The probe carves a validation part from the training images (and a test split when there is none): too few
    # files or patients for either fail here, not after pretraining.
    training = select_splits(splits, None)[1]
    train_names = training.features["label"].names
    test_set = splits.get("test")
    if probe_args.test_data_dir:
        test_set = select_splits(load_image_folder(probe_args.test_data_dir), ["all"], "test_data_dir")[1]
        test_set = label_by_class_folder(test_set, probe_args.test_data_dir, train_names)
        check_labelled(test_set, f"`test_data_dir` {probe_args.test_data_dir}")
    elif test_set is None:  # carved from every image, or from the training split beside a validation split
        check_carvable(select_splits(splits, ["train"] if own_validation_split(splits) else ["all"])[1],
                       probe_args.test_split, probe_args.split_seed)  # at once, by files, before the images are decoded
        # carved as the probe will carve it: its images are left out of pretraining
        return carved_test_ids(probe_args, pretraining_args.preprocessing)
    if not own_validation_split(splits):  # a validation split of the data's own is used as it is
        check_carvable(training, probe_args.validation_split, probe_args.split_seed, "--validation_split")
    if test_set is not None:
        test_names = test_set.features["label"].names
        check_test_classes({train_names[i] for i in set(training["label"])},
                           {test_names[i] for i in set(test_set["label"])})
        if not probe_args.skip_bad_images:  # pretraining reads the training images first; the test ones only the probe
            # no cache: nothing is written before the run's own checks; a big test folder takes a while: shown
            decode_images(test_set, pretraining_args.preprocessing, slices=probe_args.slices)
    return None


HELD_OUT_FILE = "held_out_images.txt"


@contextlib.contextmanager
def held_out_list(config: dict, image_ids: Optional[list], resuming: bool = False):
    """Writes the ids of the test images the probe will carve, which pretraining leaves out (`--exclude_image_list`),
    into a temporary file for the checks in the block, then into the run's `held_out_images.txt` if they pass (a run
    refused keeps the list of the pretraining there; one that carves nothing removes an earlier list). Yields the
    temporary file (`None` without images). Each process of a launch writes the same list through a file of its own
    (`tempfile.mkstemp`), so none reads a half-written one. A run resuming a checkpoint must carve the test images
    its pretraining left out."""
    path = os.path.join(config["output_dir"], HELD_OUT_FILE)
    if image_ids is None:
        yield None
        if os.path.isfile(path):  # an earlier run's, which this one's pretraining and report do not name
            os.remove(path)
        return
    if resuming and os.path.isfile(path):
        earlier = read_image_list(path, "held_out_images.txt")
        if sorted(earlier) != sorted(relative_image_id(image_id, config["data_dir"]) for image_id in image_ids):
            raise ValueError(f"--resume_from_checkpoint: the test images carved now differ from those the "
                             f"checkpoint's pretraining left out ({path}): give the --test_split, --split_seed, "
                             f"--duplicate_threshold and --skip_bad_images it ran with.")
    os.makedirs(config["output_dir"], exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=config["output_dir"], prefix=f".{HELD_OUT_FILE}.", suffix=".tmp")
    os.close(handle)
    try:
        write_image_list(temporary, image_ids, config["data_dir"],
                         "test images the probe of `mic-diffrep run` carves; left out of its pretraining")
        share_as_umask_allows(temporary)  # as any file the run writes, not mkstemp's 0600
        yield temporary
    except BaseException:
        os.remove(temporary)
        raise
    os.replace(temporary, path)


def run_config(namespace) -> dict:
    """`RUN_DEFAULTS`, updated by `--config` and then by the flags given."""
    config = dict(RUN_DEFAULTS)
    if namespace.config:
        config.update(load_config(namespace.config))
    flags = {k: v for k, v in vars(namespace).items() if v is not None and k in RUN_DEFAULTS}
    check_config(flags)
    config.update(flags)
    return config


def pretraining_arguments(config: dict) -> PretrainingArguments:
    epochs = config["pretrain_epochs"]
    return PretrainingArguments(
        train_data_dir=config["data_dir"], output_dir=os.path.join(config["output_dir"], "pretrain"),
        resolution=config["resolution"], resize_mode=config["resize_mode"],
        intensity_window=config["intensity_window"], model_config_name_or_path=config["model_config_name_or_path"],
        num_epochs=epochs, train_batch_size=config["pretrain_batch_size"],
        **{key: config[key] for key in RECIPE_KEYS}, mixed_precision=config["mixed_precision"],
        save_images_epochs=epochs,
        save_model_epochs=epochs, checkpointing_steps=RUN_CHECKPOINTING_STEPS, checkpoints_total_limit=1,
        eval_batch_size=config["num_images"],
        sample_scheduler=config["sample_scheduler"], ddpm_num_inference_steps=config["num_inference_steps"],
        seed=config["seed"], logger="tensorboard", cache_dir=_decode_cache(config),
        **{key: config[key] for key in _SHARED_DATA_KEYS})


def _decode_cache(config: dict) -> str:
    """One decode cache for the run's pretraining and probe, which decode the same training images (two caches held
    them twice)."""
    return os.path.join(config["output_dir"], ".cache")


def probe_arguments(config: dict) -> ProbeArguments:
    return ProbeArguments(
        pretrained=os.path.join(config["output_dir"], "pretrain"), data_dir=config["data_dir"],
        output_dir=os.path.join(config["output_dir"], "model"), timesteps=list(config["timesteps"]),
        pooling=config["pooling"], num_noise_samples=config["num_noise_samples"],
        flip_average=config["flip_average"], num_epochs=config["probe_epochs"],
        learning_rate=config["probe_learning_rate"], train_batch_size=config["probe_batch_size"],
        random_flip=config["probe_random_flip"], hidden_size=config["hidden_size"],
        test_data_dir=config["test_data_dir"], test_split=config["test_split"],
        validation_split=config["validation_split"], duplicate_threshold=config["duplicate_threshold"],
        mixed_precision=config["mixed_precision"], seed=config["seed"], split_seed=config["split_seed"],
        cache_dir=_decode_cache(config), **{key: config[key] for key in _SHARED_DATA_KEYS})


def finished_pretraining(args: PretrainingArguments, compare_images: bool = True) -> Optional[dict]:
    """The summary of a finished pretraining run in `args.output_dir` made with the same data (the same files, with
    the same contents), settings and length (which give the same weights), so that a `run` stopped or failed in its
    probe stage does not pretrain again; else `None`. `compare_images=False` compares all but the images (which
    need `args.exclude_image_list`, known once the test split is carved)."""
    try:
        with open(os.path.join(args.output_dir, SUMMARY_FILE), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    same = (os.path.isfile(os.path.join(args.output_dir, "model_index.json"))
            and summary.get("stop_reason") in ("num_epochs", "max_train_steps")
            and summary.get("settings") == args.checkpoint_settings()
            and args.mixed_precision is not None and summary.get("mixed_precision") == args.mixed_precision
            and (summary.get("num_epochs"), summary.get("max_train_steps")) == (args.num_epochs, args.max_train_steps)
            and os.path.abspath(str(summary.get("train_data_dir"))) == os.path.abspath(args.train_data_dir))
    if same and compare_images:  # images added, removed or replaced since give other weights (no record: unknown)
        _, images, excluded = training_images(args)
        same = summary.get("data_fingerprint") == training_fingerprint(
            images_fingerprint(images, args.preprocessing, args.slices), excluded)
    return summary if same else None


@contextlib.contextmanager
def naming_config_file(namespace):
    """Prefixes a `ValueError` about a setting (named in backquotes, as the settings' checks write it) with the
    `--config` file it came from, when a flag did not set it: the settings checked with the others (pretraining,
    probe, data) would otherwise read as if given on the command line."""
    try:
        yield
    except ValueError as error:
        named = re.match(r"`(\w+)`", str(error))
        given = {k for k, v in vars(namespace).items() if v is not None}
        if (namespace.config and named and named.group(1) not in given
                and named.group(1) in load_config(namespace.config)):
            raise ValueError(f"--config {namespace.config}: {error}") from None
        raise


def run(namespace) -> dict:
    """The whole method: pretrain -> sample grid -> features -> SL sweep + MSFA -> evaluation -> model -> report."""
    config = run_config(namespace)
    with naming_config_file(namespace):
        pretraining_args, probe_args = pretraining_arguments(config), probe_arguments(config)
        if namespace.resume_from_checkpoint or namespace.overwrite_output_dir:
            pretraining_args = replace(pretraining_args, resume_from_checkpoint=namespace.resume_from_checkpoint,
                                       overwrite_output_dir=namespace.overwrite_output_dir)
            probe_args = replace(probe_args, overwrite_output_dir=namespace.overwrite_output_dir)
        # A pretraining of other settings is refused before the images are read; one of the same settings is
        # reused if its images are the same too, which needs the test split carved first (its images left out).
        same_settings = finished_pretraining(pretraining_args, compare_images=False) is not None
        if not same_settings:
            check_new_run(pretraining_args.output_dir, pretraining_args.resume_from_checkpoint,
                          pretraining_args.overwrite_output_dir)
        check_new_probe(probe_args.output_dir, probe_args.overwrite_output_dir)  # not after pretraining
        held_out = check_run(config, pretraining_args, probe_args)
        with held_out_list(config, held_out, resuming=bool(namespace.resume_from_checkpoint)) as exclude_image_list:
            pretraining_args = replace(pretraining_args, exclude_image_list=exclude_image_list)
            pretraining = finished_pretraining(pretraining_args) if same_settings else None
            if pretraining is None and same_settings:
                check_new_run(pretraining_args.output_dir, pretraining_args.resume_from_checkpoint,
                              pretraining_args.overwrite_output_dir)
        if held_out is not None:
            pretraining_args = replace(pretraining_args, exclude_image_list=os.path.join(config["output_dir"],
                                                                                         HELD_OUT_FILE))
    main_process = is_first_process()  # says and writes the report, once
    say = print if main_process else (lambda *args, **kwargs: None)
    hub = None
    if namespace.push_to_hub:  # both repositories made before the work: a run that cannot upload fails at once
        pretraining_args, probe_args, hub = hub_arguments(namespace, config, pretraining_args, probe_args,
                                                          main_process)
    if pretraining is not None:
        say(f"[1/2] Pretraining: reusing the finished run in {pretraining_args.output_dir} (the same data and "
              f"settings give the same weights; another --output_dir pretrains anew)", flush=True)
        if hub and main_process:  # pretraining uploads its folder at its end; a reused one is uploaded here
            push_pipeline_to_hub(pretraining_args.output_dir, hub["pipeline"], token=namespace.hub_token,
                                 create_repo=False, logging_dir=pretraining_args.logging_dir)
    else:
        say(f"[1/2] Pretraining into {pretraining_args.output_dir}", flush=True)
        pretraining = pretrain(pretraining_args)
    if pretraining["stop_reason"] == "interrupted":  # Ctrl-C: no probe of a half-trained model
        return pretraining
    say(f"[2/2] Linear probing into {probe_args.output_dir}", flush=True)
    results = run_probe(probe_args)

    samples_dir = os.path.join(pretraining_args.output_dir, "samples")
    samples = sorted(os.listdir(samples_dir)) if os.path.isdir(samples_dir) else []
    report = {"command": command_line(["mic-diffrep"] + sys.argv[1:]), "config": config, "pretraining": pretraining,
              "probe": results,
              "files": {"pipeline": pretraining_args.output_dir, "model": probe_args.output_dir,
                        "sample_grid": os.path.join(samples_dir, samples[-1]) if samples else None,
                        "accuracy_vs_timestep": os.path.join(probe_args.output_dir, "accuracy_vs_timestep.png"),
                        "confusion_matrix": os.path.join(probe_args.output_dir, "confusion_matrix.png")},
              "hub": hub}
    if not main_process:
        return report
    write_json(os.path.join(config["output_dir"], "report.json"), report)
    with open(os.path.join(config["output_dir"], "report.md"), "w", encoding="utf-8") as f:
        f.write(run_report_markdown(report))
    msfa, sl = results["msfa"]["test"]["all"], results["sl_best"]["test"]["all"]
    print(f"\nMicDiffRep-MS test accuracy {msfa['accuracy']:.3f} (macro F1 {msfa['macro_f1']:.3f}); "
          f"SL-best {sl['accuracy']:.3f} ({results['sl_best']['layer']}, t={results['sl_best']['timestep']}).")
    print(f"Report: {os.path.join(config['output_dir'], 'report.md')}\nModel: {probe_args.output_dir}  "
          f"(mic-diffrep predict --model {probe_args.output_dir} IMAGE)")
    if hub:
        print(f"Hub: https://huggingface.co/{hub['model']} (classifier), https://huggingface.co/{hub['pipeline']} "
              f"(pretrained pipeline)")
    return report


def hub_arguments(namespace, config: dict, pretraining_args: PretrainingArguments, probe_args: ProbeArguments,
                  main_process: bool):
    """`--push_to_hub`: the classifier goes to `--hub_model_id` (default: the output folder's name) and the pretrained
    pipeline to the same name with `-pretrain` (its folder's name), whose repository the classifier's card names as
    its `base_model`. Both repositories are created here, before the work; returns the settings of pretraining and
    probe that upload into them, and the repositories' full ids."""
    model_repo = default_repo_id(config["output_dir"], namespace.hub_model_id)
    pipeline_repo = f"{model_repo}-{os.path.basename(pretraining_args.output_dir)}"
    if main_process:
        pipeline_repo = create_hub_repo(pipeline_repo, namespace.hub_token, namespace.hub_private_repo)
        model_repo = create_hub_repo(model_repo, namespace.hub_token, namespace.hub_private_repo)
    pushing = {"push_to_hub": True, "hub_token": namespace.hub_token, "hub_private_repo": namespace.hub_private_repo}
    return (replace(pretraining_args, hub_model_id=pipeline_repo, **pushing),
            replace(probe_args, hub_model_id=model_repo, **pushing), {"model": model_repo, "pipeline": pipeline_repo})


def register(subparsers) -> None:
    # Its flags default to None (= RUN_DEFAULTS / --config) and state their effective defaults in their help.
    parser = subparsers.add_parser(
        "run", formatter_class=argparse.HelpFormatter,
        help="The whole method on a dataset (default: the bundled MRI sample, about 1 minute on 2 CPU cores).",
        description="Pretrain -> sample grid -> features -> SL sweep + MSFA -> evaluation -> transformers model with "
                    "a model card -> report (Markdown, JSON, PNGs). Settings come from RUN_DEFAULTS, then --config "
                    "(a YAML/JSON file or a preset name: 'paper'), then the flags.")
    parser.add_argument("--data_dir", type=str, default=None,
                        help="Labelled image folder (Training/Testing/<class>/ or train/val/test layouts, or class "
                             "folders). Default: the bundled sample of the Brain Tumor MRI dataset.")
    parser.add_argument("--output_dir", type=str, default=None, help="Where everything goes (default runs/mic-diffrep).")
    parser.add_argument("--config", type=str, default=None,
                        help=f"A preset ({', '.join(RUN_PRESETS)}) or a YAML/JSON file with any of the keys "
                             f"{sorted(RUN_DEFAULTS)}; flags override it.")
    parser.add_argument("--resolution", type=int, default=None, help="Image size (default 64).")
    parser.add_argument("--resize_mode", type=str, default=None, choices=["pad", "center_crop"],
                        help="How non-square images become square: pad the short side with black (keeps the whole "
                             "image) or crop the centre (default pad). The pipeline and classifier keep it.")
    parser.add_argument("--intensity_window", type=str, default=None, choices=["percentile", "none"],
                        help="Intensity rule (default percentile; see `mic-diffrep pretrain --help`). The pipeline and "
                             "classifier keep it.")
    parser.add_argument("--model_config_name_or_path", type=str, default=None,
                        help=f"UNet preset ({', '.join(UNET_PRESETS)}) or config (default "
                             f"{RUN_DEFAULTS['model_config_name_or_path']!r}).")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=MIXED_PRECISION_CHOICES,
                        help="Precision of pretraining, sampling and feature extraction (default bf16).")
    parser.add_argument("--pretrain_epochs", type=int, default=None, help="Pretraining epochs (default 40).")
    parser.add_argument("--pretrain_batch_size", type=int, default=None, help="Pretraining batch size (default 32).")
    # The recipe flags: the same names, defaults and help as `mic-diffrep pretrain`.
    recipe_help = {f.name: f.metadata["help"] for f in fields(PretrainingArguments) if f.name in RECIPE_KEYS}
    for name in RECIPE_KEYS:
        default = RUN_DEFAULTS[name]
        kind = {"learning_rate": float, "timestep_power": float, "random_crop_scale": float, "unet_dropout": float,
                "snr_gamma": float, "lr_warmup_steps": int, "max_train_timestep": int, "lr_scheduler": str,
                "ddpm_beta_schedule": str}.get(name)
        help_text = recipe_help[name]  # with its default, unless it states it already (or it is None: unset)
        if default is not None and "default" not in help_text.lower():
            help_text += f" (default {default})"
        if kind is None:  # switches, each with its --no_ form (a --config file may turn it on)
            parser.add_argument(f"--{name}", action="store_const", const=True, default=None, help=help_text)
            parser.add_argument(f"--no_{name}", dest=name, action="store_const", const=False,
                                help=f"Turn --{name} off.")
        else:
            parser.add_argument(f"--{name}", type=kind, default=None, help=help_text)
    parser.add_argument("--num_images", type=int, default=None,
                        help=f"Images in the sample grid (default {RUN_DEFAULTS['num_images']}; as `generate "
                             f"--num_images`, `pretrain --eval_batch_size`).")
    parser.add_argument("--num_samples", type=int, dest="num_images", action=DeprecatedFlag, new_flag="--num_images")
    parser.add_argument("--sample_scheduler", type=str, default=None, choices=["ddim", "ddpm"],
                        help="Sampler of the sample grid (default ddim; the paper's: ddpm).")
    parser.add_argument("--num_inference_steps", type=int, default=None,
                        help=f"Steps of the sample grid's sampler (default {RUN_DEFAULTS['num_inference_steps']}; as "
                             f"`generate --num_inference_steps`, `pretrain --ddpm_num_inference_steps`).")
    parser.add_argument("--sampling_steps", type=int, dest="num_inference_steps", action=DeprecatedFlag,
                        new_flag="--num_inference_steps")
    parser.add_argument("--timesteps", type=int, nargs="+", default=None,
                        help="Timesteps of the probe sweep (default "
                             f"{' '.join(map(str, RUN_DEFAULTS['timesteps']))}).")
    parser.add_argument("--pooling", type=str, default=None, choices=["avg", "avgmax", "grid"],
                        help=f"How block activations are pooled into vectors: average, average and max concatenated, "
                             f"or average over a 2x2 grid of regions (default {RUN_DEFAULTS['pooling']}; paper: avg).")
    parser.add_argument("--num_noise_samples", type=int, default=None,
                        help=f"Noise draws averaged per image (default {RUN_DEFAULTS['num_noise_samples']}).")
    parser.add_argument("--flip_average", action="store_const", const=True, default=None,
                        help="Average the features of each image and of its mirror image (default "
                             f"{RUN_DEFAULTS['flip_average']}).")
    parser.add_argument("--no_flip_average", dest="flip_average", action="store_const", const=False,
                        help="One view per image.")
    parser.add_argument("--probe_epochs", type=int, default=None, help="Probe epochs (default 15).")
    parser.add_argument("--probe_learning_rate", type=float, default=None, help="Probe learning rate (default 0.01).")
    parser.add_argument("--probe_batch_size", type=int, default=None, help="Probe batch size (default 128).")
    parser.add_argument("--probe_random_flip", action="store_const", const=True, default=None,
                        help="Train the probe's heads on each training image or, at random, its mirror image "
                             f"(`mic-diffrep probe --random_flip`; default {RUN_DEFAULTS['probe_random_flip']}).")
    parser.add_argument("--no_probe_random_flip", dest="probe_random_flip", action="store_const", const=False,
                        help="Train the probe's heads on the training images as they are.")
    parser.add_argument("--hidden_size", type=int, default=None, help="MSFA hidden size (default 512; 0: a single linear layer, not the paper's MSFA).")
    # The probe's splits, under `mic-diffrep probe`'s names (its errors name these flags)
    parser.add_argument("--test_data_dir", type=str, default=None,
                        help="Labelled test images (default: the test split of --data_dir, else a carved hold-out).")
    parser.add_argument("--test_split", type=float, default=None,
                        help=f"Share of images held out for testing when there is no test split (default "
                             f"{RUN_DEFAULTS['test_split']}).")
    parser.add_argument("--validation_split", type=float, default=None,
                        help=f"Share of the training images held out for choosing layers and timesteps when the "
                             f"data has no val/ folder beside train/ (default {RUN_DEFAULTS['validation_split']}).")
    parser.add_argument("--duplicate_threshold", type=float, default=None,
                        help="Fingerprint similarity above which images are near-duplicates, kept on one side of "
                             "every carved split (default: mic_diffrep.leakage.DEFAULT_THRESHOLD).")
    parser.add_argument("--seed", type=int, default=None,
                        help="Seed of pretraining and of the probe's training (default 0).")
    parser.add_argument("--split_seed", type=int, default=None,
                        help="Seed of the validation and test parts carved from the data (default 0): apart from "
                             "--seed, so that runs of several seeds are scored on the same images.")
    parser.add_argument("--skip_bad_images", action="store_const", const=True, default=None,
                        help="Skip unreadable images (listed in the results) instead of failing.")
    parser.add_argument("--no_skip_bad_images", dest="skip_bad_images", action="store_const", const=False,
                        help="Stop with an error naming the unreadable images.")
    add_slice_arguments(parser, unset="Default: a --config's value, else axis 2, every slice, empty slices skipped.")
    parser.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help="Continue an interrupted run's pretraining: 'latest' (its last checkpoint, saved every "
                             f"{RUN_CHECKPOINTING_STEPS} steps and by Ctrl-C or SIGTERM) or a "
                             "checkpoint folder; give the run's other settings again.")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="Run again in an --output_dir holding an earlier run: replace its model/ folder's "
                             "results and model, and pretrain anew when its pretrain/ folder holds a checkpoint or "
                             "weights of other settings (both refused without it; add --resume_from_checkpoint latest "
                             "to continue an interrupted run); a finished pretraining of the same settings is reused "
                             "either way.")
    parser.add_argument("--push_to_hub", action="store_true",
                        help="Upload the classifier to --hub_model_id and the pretrained pipeline to the same name "
                             "with -pretrain, which the classifier's model card names as its base_model (both "
                             "repositories are created before the work).")
    parser.add_argument("--hub_model_id", type=str, default=None,
                        help="Hub repository of the classifier (default: the --output_dir folder's name).")
    parser.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the stored login).")
    parser.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repositories as private.")
    parser.set_defaults(func=run)
