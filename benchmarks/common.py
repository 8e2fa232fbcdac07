"""What the benchmarks share: equal pretraining budgets, the data and its protocols, cached features, probes.

**Budgets.** A wall-clock budget is turned into optimizer steps *before* training: each method's (and recipe's)
steps/s is measured on two short runs of its own training code (10 and 60 steps; the difference leaves out start-up
and kernel warm-up) and stored in `WORK_DIR/calibration/NAME.json`. A budget of M minutes is then `M * 60 * steps/s`
steps, and the learning-rate schedule is laid over exactly those steps. Training stops on steps, never on the
clock, so a run's result does not depend on what else the machine did meanwhile (the minutes it really took are
recorded in its summary), and every budget of a method uses one calibration. A recipe compared with one calibrated in
an earlier session, on a machine of another speed, is measured back to back with it and scaled (`calibrate`'s
`reference`).

**Protocols.** The 5,708 training images of the Brain Tumor MRI dataset come from two collections (`sources.csv`):
SARTAJ and figshare/Br35H. *Cross-source*: train on one, test on the other, both directions. *In-split*: a stratified
80/20 split of all images keeping near-duplicate groups on one side. In every protocol, layers, timesteps and
recipes are chosen on a validation part carved from the training side (20%, near-duplicate groups on one side);
test accuracy is reported, never used to choose. *dedup*: accuracy on the test images with no near-duplicate in the
training side.
"""

import argparse
import copy
import csv
import dataclasses
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from mic_diffrep.commands.base import settings_from  # noqa: E402
from mic_diffrep.data import ImagePreprocessing, decode_images, load_image_folder  # noqa: E402
from mic_diffrep.features import (DiffusionFeatureExtractor, EncoderFeatureExtractor, FeatureArguments,  # noqa: E402
                                  FeatureExtractor, StaleFeatureCacheError, load_features,
                                  pixels_fingerprint, save_features)
from mic_diffrep.leakage import (DEFAULT_THRESHOLD, check_leakage, duplicate_groups, exact_keys,  # noqa: E402
                                 fingerprint_images, group_stratified_split)
from mic_diffrep.probing import ProbeConfig, run_probes  # noqa: E402
from mic_diffrep.training import (BaselinePretrainingArguments, PretrainingArguments, pretrain,  # noqa: E402
                                  pretrain_baseline)
from mic_diffrep.training.arguments import BASELINE_OPTIMISER_DEFAULTS  # noqa: E402
from mic_diffrep.utils import environment_info  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402


logger = logging.getLogger("benchmark")

CALIBRATION_STEPS = (10, 60)
BASELINES = ("mocov2", "byol", "mae")
DEFAULT_DATA_DIR = os.path.join(REPO, "..", "shared", "data", "brain-tumor-mri")
DIRECTIONS = (("sartaj->other", "sartaj"), ("other->sartaj", "figshare_or_br35h"))
# The scripts' --max_images: `Benchmark(max_images=)` subsets the probes' images; pretraining reads Training/ itself.
MAX_IMAGES_HELP = ("Probe a random subset of the images (smoke runs only): pretraining still sees every image of "
                   "Training/, for the minutes it is given.")

# Baselines trained with other flags than the shared settings of the first benchmark runs: run name and flags.
# MAE: its own optimiser, chosen on validation (`benchmarks/baseline_recipes.py` -> `results/baseline_recipes.md`)
# and the package's default for `--method mae` since; named apart from the runs made before with the shared settings.
BASELINE_RECIPES: Dict[str, Tuple[str, List[str]]] = {
    "mae": ("mae-own-optimiser", [arg for name, value in BASELINE_OPTIMISER_DEFAULTS["mae"].items()
                                  for arg in (f"--{name}", f"{value:g}")]),
}


# ------------------------------------------------------------------------------------------------------------------
# Budgets
# ------------------------------------------------------------------------------------------------------------------



def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (`--max_images 0` took every image, `-5` all but five)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def unet_config(text: str) -> str:
    """An argparse type for `--unet`: a UNet preset's name or a UNet config file, checked before hours of work."""
    from mic_diffrep.models.mic_diffrep.unet import UNET_PRESETS

    if text in UNET_PRESETS or os.path.isfile(text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither a UNet preset ({', '.join(UNET_PRESETS)}) nor a config file")


def positive_float(text: str) -> float:
    """An argparse type: a number above 0 (a budget of 0 or fewer minutes trained one step)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def output_prefix(text: str) -> str:
    """An argparse type for `--output`, the path prefix of a script's results (`OUTPUT.json`, `OUTPUT.md`, ...): its
    folder is made and written to now, so that a run of hours does not fail at its end."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder; give the results' path prefix, e.g. "
                                         f"{os.path.join(text, 'results')}")
    writable_folder(os.path.dirname(os.path.abspath(text)))
    return text


def writable_folder(text: str) -> str:
    """An argparse type for a folder a script writes into (`--work_dir`, `--output_dir`): made if needed and written
    to now, not hours later."""
    try:
        os.makedirs(text, exist_ok=True)
        with tempfile.TemporaryFile(dir=text):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot write into {text} ({error.strerror or error})") from None
    return text


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The scripts' `--help`: the module docstring as written, and every flag's default (a flag without a help line
    too, which argparse would list bare)."""

    def _format_action(self, action):
        if not action.help and action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


OVERWRITE_HELP = ("Replace the results recorded in OUTPUT.json (hours of runs, and by default the committed ones), "
                  "which a run that would drop any of them refuses to do without it.")


def check_recorded_results(output: str, overwrite: bool, kept: int = 0, reusable: bool = False) -> None:
    """Refuses, before any work, a run that would replace results recorded in `OUTPUT.json` (the rows or points of
    hours of runs; by default the committed ones) when it keeps fewer than all of them (`kept`), unless
    `--overwrite_output`. `reusable`: the script takes `--reuse_results`, which keeps those of the same settings."""
    path = output + ".json"
    if overwrite or not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        recorded = {}
    entries = recorded.get("rows") or recorded.get("points") if isinstance(recorded, dict) else None
    count = len(entries) if entries else 1
    if kept >= count:
        return
    what = f"{count} recorded {'rows' if recorded.get('rows') else 'points'}" if entries else "recorded results"
    hint = " (--reuse_results keeps those measured with the same settings)" if reusable else ""
    raise SystemExit(f"{os.path.basename(sys.argv[0])}: error: {path} holds {what}, of which this run would keep "
                     f"{kept}{hint}: give another --output, or --overwrite_output to replace them; nothing was "
                     f"written.")


def run_main(main) -> None:
    """Runs a script's `main`, a missing or mistyped data or work folder ending it with one line naming it (exit 2),
    as the package's commands do."""
    try:
        main()
    except (FileNotFoundError, NotADirectoryError) as error:
        raise SystemExit(f"{os.path.basename(sys.argv[0])}: error: {error}") from None


def slug(text: str) -> str:
    """`text` as a file or folder name: letters, digits, '-' and '.' kept, the rest '_'."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text).strip("_")


def write_results(output: str, result: Dict, markdown: str) -> None:
    """`result` as `OUTPUT.json` and its rendering as `OUTPUT.md`."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(output + ".md", "w") as f:
        f.write(markdown)


def machine_line(env: Dict, libraries: Sequence[str] = ("torch", "diffusers", "transformers")) -> str:
    """A results file's `Machine:` line from its recorded `environment`: processor, CPUs, GPU, and the versions of
    `libraries` it recorded."""
    versions = ", ".join(f"{name} {env[name]}" for name in libraries if name in env)
    return f"Machine: {env['processor']}, {env['cpu_count']} CPUs, {env.get('cuda') or 'no GPU'}; {versions}"


def command_line() -> str:
    """The command that is running, quoted so that it can be pasted into a shell."""
    return "python " + shlex.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])


def provenance(recorded: Dict, measured: bool) -> Dict:
    """The `command` of a results file written now: the running command when it measured something; a re-render of
    recorded results (nothing measured) keeps the command that measured them, and names itself `rendered_by`."""
    if measured or not recorded.get("command"):
        return {"command": command_line()}
    return {"command": recorded["command"], "rendered_by": command_line()}


def rendered_lines(result: Dict) -> List[str]:
    """The results file's line saying it was rendered again from its JSON (`provenance`), if it was."""
    if not result.get("rendered_by"):
        return []
    return [f"Rendered again from the recorded `.json` (no figure measured anew): `{result['rendered_by']}`", ""]


def common_argv(data_dir: str, work_dir: str, resolution: int, seed: int) -> List[str]:
    # the real path: a run or calibration is the same whichever way its folder was named (`../shared` or not)
    return ["--train_data_dir", os.path.realpath(os.path.join(data_dir, "Training")), "--resolution", str(resolution),
            "--mixed_precision", "bf16", "--seed", str(seed), "--logger", "none",
            "--cache_dir", os.path.join(work_dir, "decoded")]


def method_argv(method: str, recipe_argv: Sequence[str] = ()) -> List[str]:
    """Flags of one method's pretraining beyond the common ones: `--method` for the baselines; no sample grids and
    no intermediate pipeline saves for the diffusion model (the benchmark samples once, after training)."""
    if method in BASELINES:
        return ["--method", method, *recipe_argv]
    return ["--save_images_epochs", "0", "--save_model_epochs", "1000000", *recipe_argv]


def calibration_argv(method: str, data_dir: str, work_dir: str, resolution: int,
                     recipe_argv: Sequence[str] = ()) -> List[str]:
    """Flags a calibration of `method` with `recipe_argv` is measured (or restored) with: those of seed 0 (every seed
    shares seed 0's calibration)."""
    return common_argv(data_dir, work_dir, resolution, 0) + method_argv(method, recipe_argv)


def run_pretraining(method: str, argv: List[str]) -> dict:
    """Pretrains from command-line flags in this process (as `training/pretrain*.py` would); returns the summary. A
    run stopped by Ctrl-C or SIGTERM (it saved a checkpoint and returned) raises `KeyboardInterrupt`: the script
    stops there, records nothing of it, and continues it when run again."""
    settings_class, function = ((BaselinePretrainingArguments, pretrain_baseline) if method in BASELINES
                                else (PretrainingArguments, pretrain))
    logger.info("Pretraining %s: %s", method, " ".join(argv))
    summary = function(settings_from(settings_class, HfArgumentParser(settings_class).parse_args(argv)))
    if summary.get("stop_reason") == "interrupted":
        raise KeyboardInterrupt(f"{method} pretraining interrupted at step {summary.get('global_step')}")
    return summary


# Settings that say where a run writes or how long it runs, not what it learns: left out of `training_settings`.
_OUTPUT_SETTINGS = {"output_dir", "cache_dir", "logger", "logging_dir", "save_images_epochs", "save_model_epochs",
                    "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint", "overwrite_output_dir",
                    "max_train_steps", "dataloader_num_workers", "eval_batch_size", "sample_scheduler",
                    "ddpm_num_inference_steps", "push_to_hub", "hub_model_id", "hub_token", "hub_private_repo"}


def training_settings(method: str, argv: Sequence[str]) -> Dict:
    """Every setting a pretraining run with `argv` learns with: its flags *and* the package defaults they leave, so a
    run made before a default changed is told apart from one made after."""
    settings_class = BaselinePretrainingArguments if method in BASELINES else PretrainingArguments
    parsed = settings_from(settings_class, HfArgumentParser(settings_class).parse_args(
        ["--output_dir", "unused", *argv]))
    settings = {k: v for k, v in dataclasses.asdict(parsed).items() if k not in _OUTPUT_SETTINGS}
    return json.loads(json.dumps(settings, default=str))


def check_settings(path: str, recorded: Optional[Dict], wanted: Dict) -> None:
    """Refuses to reuse a calibration or run (`path`) recorded with other settings than `wanted`. A setting absent
    from the record (added to the package since) matches when it is None or False now: a lever left off."""
    if recorded is None:
        return
    changed = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k)
                     and not (k not in recorded and wanted.get(k) in (None, False)))
    if not changed:
        return
    details = ", ".join(f"{k}: {recorded.get(k)!r} there, {wanted.get(k)!r} now" for k in changed)
    raise ValueError(f"{path} was made with other pretraining settings ({details}). Give this recipe another run "
                     "name, or move the old one away.")


def measure_throughput(method: str, name: str, work_dir: str, base_argv: List[str]) -> Dict:
    """Steps/s and images/step of one method (and recipe `name`) on this machine now: two short runs of its own
    training code (`CALIBRATION_STEPS`), the difference leaving out start-up and kernel warm-up."""
    seconds, summaries = [], []
    for steps in CALIBRATION_STEPS:
        output_dir = os.path.join(work_dir, "calibration", f"{name}-{steps}")
        shutil.rmtree(output_dir, ignore_errors=True)
        summary = run_pretraining(method, base_argv + ["--output_dir", output_dir, "--max_train_steps", str(steps),
                                                       "--checkpointing_steps", "1000000"])
        seconds.append(60 * summary["train_minutes"])
        summaries.append(summary)
        shutil.rmtree(output_dir)
    steps_per_second = (CALIBRATION_STEPS[1] - CALIBRATION_STEPS[0]) / max(seconds[1] - seconds[0], 1e-3)
    return {"steps_per_second": steps_per_second,
            "images_per_step": summaries[1]["images_seen"] / CALIBRATION_STEPS[1], "calibration_seconds": seconds}


def calibrate(method: str, name: str, work_dir: str, base_argv: List[str],
              reference: Optional[Tuple[str, List[str]]] = None) -> dict:
    """Steps/s of one method (and recipe `name`), measured once and cached in `WORK_DIR/calibration/NAME.json`
    with the settings it was measured with (a cached one with other settings is refused: `check_settings`).

    `reference=(name, argv)`: a recipe whose cached calibration (measured or restored) this one is measured against,
    for a comparison of recipes of unequal compute across machines of unequal speed (the reference calibrated on one
    twice as fast as a later session's): the reference is measured again before and after this recipe, back to back,
    and this recipe's steps/s is its own measurement times the reference's cached steps/s over the mean of those two,
    i.e. the steps it would train on the reference's machine."""
    path = os.path.join(work_dir, "calibration", f"{name}.json")
    settings = training_settings(method, base_argv)
    if os.path.isfile(path):
        with open(path) as f:
            result = json.load(f)
        check_settings(path, result.get("settings"), settings)
        if result.get("settings") is None:  # measured before settings were recorded: recorded from now on
            result["settings"] = settings
            with open(path, "w") as f:
                json.dump(result, f, indent=2)
        return result
    result = {"method": method, "name": name}
    if reference is None:
        measured, speed = measure_throughput(method, name, work_dir, base_argv), 1.0
    else:
        reference_name, reference_argv = reference
        recorded = calibrate(method, reference_name, work_dir, reference_argv)
        now = [measure_throughput(method, reference_name + "-now", work_dir, reference_argv)["steps_per_second"]]
        measured = measure_throughput(method, name, work_dir, base_argv)
        now.append(measure_throughput(method, reference_name + "-now", work_dir, reference_argv)["steps_per_second"])
        speed = float(np.mean(now)) / recorded["steps_per_second"]  # this machine's against the reference's
        result["reference"] = {"name": reference_name, "steps_per_second": recorded["steps_per_second"],
                               "measured_steps_per_second": now, "measured_steps_per_second_here":
                               measured["steps_per_second"], "machine_speed": speed}
    steps_per_second = measured["steps_per_second"] / speed
    result.update({"steps_per_second": steps_per_second,
                   "images_per_second": steps_per_second * measured["images_per_step"],
                   "calibration_steps": list(CALIBRATION_STEPS), "calibration_seconds": measured["calibration_seconds"],
                   "argv": base_argv, "settings": settings, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "environment": environment_info()})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    logger.info("%s: %.3f steps/s (%.1f images/s) measured before pretraining%s", name, steps_per_second,
                result["images_per_second"], f" (scaled by {reference[0]}'s speed here, x{1 / speed:.2f})"
                if reference else "")
    return result


def restore_calibration(method: str, name: str, work_dir: str, data_dir: str, resolution: int,
                        recipe_argv: Sequence[str], planned_steps: int, minutes: float,
                        images_per_second: Optional[float], source: str) -> None:
    """Writes the calibration of recipe `name` back from a results file (`source`) that recorded what it gave:
    `planned_steps` for a budget of `minutes`. For a machine whose calibration cache is gone (a fresh clone): a
    recipe of the same compute (`pretrain_for_budget(..., calibrated_as=)`) then trains the steps the recorded run
    did, not those of a new measurement (the machine's speed drifts up to 15% between sessions). A calibration
    already cached is left alone."""
    path = os.path.join(work_dir, "calibration", f"{name}.json")
    if os.path.isfile(path):
        return
    argv = calibration_argv(method, data_dir, work_dir, resolution, recipe_argv)
    result = {"method": method, "name": name,
              # half a step more, so that `int(minutes * 60 * steps_per_second)` gives `planned_steps` back exactly
              "steps_per_second": (planned_steps + 0.5) / (minutes * 60), "images_per_second": images_per_second,
              "argv": argv, "settings": training_settings(method, argv), "restored_from": source}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    logger.info("%s: calibration restored from %s (%d steps in %g minutes)", name, source, planned_steps, minutes)


# The benchmarks' MicDiffRep runs train the package's default recipe and are named after it. A run or calibration made
# under another recipe is refused (`check_settings`), so this name changes when the default recipe does.
# The runs of the default recipe; "micdiffrep-small": timestep power 2, the default before; "micdiffrep": the 4.3M
# "base" UNet, the default before that.
MICDIFFREP_RUN = "micdiffrep-small-power3"


def micdiffrep_recipe(unet: Optional[str] = None) -> Dict:
    """`pretrain_for_budget` keywords (`name`, `recipe_argv`) of the package's default recipe, with another UNet
    preset or config if `unet` is given.

    >>> micdiffrep_recipe("tiny")
    {'name': 'micdiffrep-small-power3-tiny', 'recipe_argv': ['--model_config_name_or_path', 'tiny']}
    """
    if unet is None:
        return {"name": MICDIFFREP_RUN, "recipe_argv": []}
    return {"name": f"{MICDIFFREP_RUN}-{slug(unet)}", "recipe_argv": ["--model_config_name_or_path", unet]}


def micdiffrep_run(minutes: float, work_dir: str, data_dir: str, resolution: int = 64, seed: int = 0,
                   unet: Optional[str] = None) -> Dict:
    """`pretrain_for_budget` of the package's default recipe (`micdiffrep_recipe`); the run folder is
    `WORK_DIR/MICDIFFREP_RUN[-UNET]-Mmin`."""
    return pretrain_for_budget("micdiffrep", minutes, work_dir, data_dir, resolution, seed, **micdiffrep_recipe(unet))


def readout_arguments(flip_average: bool = False, pooling: Optional[str] = None,
                      timesteps: Optional[Sequence[int]] = None) -> FeatureArguments:
    """The package's default read-out with the benchmark flags that were given (`None` keeps the default)."""
    given = {name: value for name, value in dict(pooling=pooling, timesteps=timesteps).items() if value is not None}
    return FeatureArguments(flip_average=flip_average, **given)


def feature_cache_name(name: str, args: FeatureArguments) -> str:
    """The feature cache of run `name` under read-out `args` (flip-averaged or otherwise pooled features are cached
    apart)."""
    return name + ("-flip" if args.flip_average else "") + ("" if args.pooling == "avg" else f"-{args.pooling}")


def run_feature_cache_name(run: Dict, args: FeatureArguments) -> str:
    """`feature_cache_name` of a `pretrain_for_budget` run: its folder's name, so the scripts sharing a run share
    its features."""
    return feature_cache_name(os.path.basename(run["output_dir"]), args)


def baseline_recipe(method: str) -> Dict:
    """`pretrain_for_budget` keywords (`name`, `recipe_argv`) of a baseline's chosen recipe; none for the shared
    settings.

    >>> sorted(baseline_recipe("mocov2"))
    []
    """
    if method not in BASELINE_RECIPES:
        return {}
    name, flags = BASELINE_RECIPES[method]
    return {"name": name, "recipe_argv": list(flags)}


def method_recipe(method: str, unet: Optional[str] = None) -> Dict:
    """`pretrain_for_budget` keywords of `method`'s chosen recipe: `micdiffrep_recipe` or `baseline_recipe`."""
    return micdiffrep_recipe(unet) if method == "micdiffrep" else baseline_recipe(method)


def budget_run_dir(work_dir: str, name: str, minutes: float, seed: int = 0) -> str:
    """The folder `pretrain_for_budget` trains run `name` in: `WORK_DIR/NAME[-seedS]-Mmin`.

    >>> budget_run_dir("runs", "mocov2", 30.0, seed=3)
    'runs/mocov2-seed3-30min'
    """
    return os.path.join(work_dir, name + (f"-seed{seed}" if seed else "") + f"-{minutes:g}min")


def pretrain_for_budget(method: str, minutes: float, work_dir: str, data_dir: str, resolution: int = 64, seed: int = 0,
                        recipe_argv: Sequence[str] = (), name: Optional[str] = None,
                        calibrated_as: Optional[Tuple[str, Sequence[str]]] = None,
                        calibrated_against: Optional[Tuple[str, Sequence[str]]] = None) -> Dict:
    """Pretrains `method` (a baseline, or `"micdiffrep"` with the pretraining flags `recipe_argv`) for `minutes` of
    its calibrated throughput; returns `{"output_dir", "summary", "calibration", "budget_minutes",
    "planned_steps"}`. A seed other than 0 gets its own run folder (`NAME-seedS-Mmin`) but seed 0's calibration: a
    seed changes no compute, so every seed trains the same number of steps (a calibration per seed would carry the
    machine's speed drift between sessions, 15% here, into the comparison of seeds). For the same reason a recipe
    whose compute per step is another's (it changes only the loss, say) shares that one's calibration:
    `calibrated_as=(name, recipe_argv)` of the other. A recipe of another compute per step measured against one of
    a recorded budget (its calibration restored from a results file made on a faster machine, say):
    `calibrated_against=(name, recipe_argv)` of that one (`calibrate(reference=)`). A finished run (its
    `pretraining_summary.json` exists) is reused if it was made with the same settings (recorded in its
    `benchmark_settings.json`); one made with others is refused rather than reused."""
    name, recipe = name or method, method_argv(method, recipe_argv)
    argv = common_argv(data_dir, work_dir, resolution, seed) + recipe
    calibration_name, calibration_recipe = calibrated_as or (name, recipe_argv)
    if calibrated_as and calibrated_against:
        raise ValueError("A recipe shares another's calibration (calibrated_as) or is measured against one "
                         "(calibrated_against), not both.")
    reference = calibrated_against and (calibrated_against[0], calibration_argv(
        method, data_dir, work_dir, resolution, calibrated_against[1]))
    calibration = calibrate(method, calibration_name, work_dir,
                            calibration_argv(method, data_dir, work_dir, resolution, calibration_recipe),
                            reference=reference)
    steps = max(1, int(minutes * 60 * calibration["steps_per_second"]))
    output_dir = budget_run_dir(work_dir, name, minutes, seed)
    summary_file = os.path.join(output_dir, "pretraining_summary.json")
    settings_file = os.path.join(output_dir, "benchmark_settings.json")
    settings = dict(training_settings(method, argv), max_train_steps=steps)
    if os.path.isfile(settings_file):
        with open(settings_file) as f:
            check_settings(output_dir, json.load(f), settings)
    summary = None
    if os.path.isfile(summary_file):
        with open(summary_file) as f:
            summary = json.load(f)
        if summary.get("stop_reason") == "interrupted":  # continued from its checkpoint below, not reused
            summary = None
        else:
            logger.info("Reusing %s", output_dir)
    if summary is None:
        os.makedirs(output_dir, exist_ok=True)
        with open(settings_file, "w") as f:  # before training, so a resumed run is checked too
            json.dump(settings, f, indent=2)
        summary = run_pretraining(method, argv + [
            "--output_dir", output_dir, "--max_train_steps", str(steps), "--checkpointing_steps", "1000",
            "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest"])
    if not os.path.isfile(settings_file):  # finished before settings were recorded: recorded from now on
        with open(settings_file, "w") as f:
            json.dump(settings, f, indent=2)
    return {"output_dir": output_dir, "summary": summary, "calibration": calibration, "budget_minutes": minutes,
            "planned_steps": steps}


# ------------------------------------------------------------------------------------------------------------------
# Data and protocols
# ------------------------------------------------------------------------------------------------------------------


def image_sources(data_dir: str, paths: Sequence[str]) -> np.ndarray:
    """The source collection of each image (`DATA_DIR/sources.csv`: `file,label,source` rows, `file` relative to
    DATA_DIR), which the cross-source protocols split by; a clear error where the file or a row is missing."""
    path = os.path.join(data_dir, "sources.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: the benchmarks need each Training image's source collection (`file,label,source`, "
            f"source `sartaj` or `figshare_or_br35h`; the Kaggle download does not hold it). See the README's "
            f"Benchmarks section.")
    with open(path, newline="") as f:
        source_of = {row["file"]: row["source"] for row in csv.DictReader(f)}
    relative = [os.path.relpath(p, data_dir).replace(os.sep, "/") for p in paths]
    missing = [name for name in relative if name not in source_of]
    if missing:
        raise ValueError(f"{path} has no row for {len(missing)} image(s), e.g. {missing[:3]}.")
    return np.array([source_of[name] for name in relative])


class Benchmark:
    """The decoded training images with their sources, near-duplicate groups, and the protocols' splits."""

    def __init__(self, data_dir: str, work_dir: str, resolution: int = 64, seed: int = 0,
                 max_images: Optional[int] = None):
        self.data_dir, self.work_dir, self.seed = data_dir, work_dir, seed
        dataset = load_image_folder(os.path.join(data_dir, "Training"))["train"]
        self.decoded = decode_images(dataset, ImagePreprocessing(resolution), cache_dir=os.path.join(work_dir, "decoded"))
        self.sources = image_sources(data_dir, self.decoded.paths)
        if max_images:
            keep = np.sort(np.random.default_rng(seed).permutation(len(self.decoded))[:max_images])
            self.decoded, self.sources = self.decoded.subset(keep.tolist()), self.sources[keep]
        self.groups = duplicate_groups(fingerprint_images(self.decoded.pixels), DEFAULT_THRESHOLD,
                                       keys=exact_keys(self.decoded.pixels))

    @property
    def labels(self) -> torch.Tensor:
        return self.decoded.labels

    @property
    def label_names(self) -> List[str]:
        return self.decoded.label_names

    def split(self, protocol: str) -> Dict:
        """`{"train", "test"}` index arrays, the validation mask of the training side, and the test images with a
        near-duplicate in train, for `"sartaj->other"`, `"other->sartaj"` or `"in-split"`."""
        if protocol == "in-split":
            train_idx, test_idx = group_stratified_split(self.labels, self.groups, 0.2, seed=self.seed)
        else:
            train_source = dict(DIRECTIONS)[protocol]
            train_idx = np.flatnonzero(self.sources == train_source)
            test_idx = np.flatnonzero(self.sources != train_source)
        _, validation = group_stratified_split(self.labels[train_idx], self.groups[train_idx], 0.2, seed=self.seed)
        validation_mask = torch.zeros(len(train_idx), dtype=torch.bool)
        validation_mask[torch.as_tensor(validation, dtype=torch.long)] = True
        leakage = check_leakage(self.decoded.subset(train_idx.tolist()), self.decoded.subset(test_idx.tolist()))
        leaked = torch.zeros(len(test_idx), dtype=torch.bool)
        leaked[torch.as_tensor(leakage.leaked_test_indices, dtype=torch.long)] = True
        return {"protocol": protocol, "train": torch.as_tensor(train_idx), "test": torch.as_tensor(test_idx),
                "validation_mask": validation_mask, "leaked": leaked}


# ------------------------------------------------------------------------------------------------------------------
# Features and probes
# ------------------------------------------------------------------------------------------------------------------


def load_extractor(method: str, run_dir: str) -> FeatureExtractor:
    """The frozen feature extractor of a `pretrain_for_budget` run: the diffusion pipeline in bf16, or a baseline's
    encoder (whose `resolve` reads features at timestep 0 whatever the read-out asks)."""
    if method == "micdiffrep":
        return DiffusionFeatureExtractor.from_pretrained(run_dir, dtype=torch.bfloat16)
    return EncoderFeatureExtractor.from_pretrained(run_dir)


def cached_extract(extractor: FeatureExtractor, bench: Benchmark, args: FeatureArguments, name: str,
                   mirrored: bool = False):
    """Features of every benchmark image (the classifier's fixed noise), or of its mirror image with `mirrored`,
    cached in `WORK_DIR/features/NAME[-mirrored]`; returns `(features, images_per_second)` (of the extraction that
    made them)."""
    args = extractor.resolve(args)
    decoded = bench.decoded.mirrored() if mirrored else bench.decoded
    settings = {**extractor.cache_settings(args), "noise": "fixed", **({"mirrored": True} if mirrored else {}),
                "pixels": pixels_fingerprint(decoded.pixels)}
    path = os.path.join(bench.work_dir, "features", f"{name}{'-mirrored' if mirrored else ''}.safetensors")
    speed_file = path.replace(".safetensors", "-speed.json")
    if os.path.isfile(path) and os.path.isfile(speed_file):
        try:
            with open(speed_file) as f:
                speed = json.load(f)["images_per_second"]
            return load_features(path, settings, bench.decoded.paths).features, speed
        except StaleFeatureCacheError as error:
            logger.warning("%s", error)
    start = time.perf_counter()
    features = extractor.extract(decoded.pixels, args)
    speed = len(bench.decoded) / (time.perf_counter() - start)
    save_features(path, features, settings, bench.decoded.paths, bench.labels, bench.label_names)
    with open(speed_file, "w") as f:
        json.dump({"images_per_second": speed}, f)
    return features, speed


def layer_order(features) -> List[str]:
    """Block names of a feature dict in UNet execution order (baseline encoders have one block, "encoder")."""
    def order(name):
        kind, _, index = name.partition(".")
        return ({"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(kind, 3), int(index or 0))

    return sorted(dict.fromkeys(key[0] for key in features), key=order)


def probe_protocol(features: Dict[Tuple[str, int], torch.Tensor], bench: Benchmark, split: Dict,
                   config: ProbeConfig, mirrored: Optional[Dict[Tuple[str, int], torch.Tensor]] = None) -> dict:
    """SL sweep and MSFA on one protocol: chosen on the validation part, refit on the training side, test scored
    once (all test images and the de-duplicated ones). `mirrored`: every image's features mirrored left-right, for
    `config.random_flip`."""
    train_idx, test_idx = split["train"], split["test"]
    labels = bench.labels
    train_mirrored = None if mirrored is None else {k: v[train_idx] for k, v in mirrored.items()}
    results, _ = run_probes({k: v[train_idx] for k, v in features.items()}, labels[train_idx],
                            {k: v[test_idx] for k, v in features.items()}, labels[test_idx], bench.label_names,
                            split["validation_mask"], config, layer_order(features),
                            sorted({key[1] for key in features}), test_subsets={"deduplicated": ~split["leaked"]},
                            train_features_mirrored=train_mirrored)
    return results
