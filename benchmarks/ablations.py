#!/usr/bin/env python
"""Which diffusion pretraining recipe and read-out to ship: every candidate on a short proxy budget, chosen on
validation accuracy only.

    python benchmarks/ablations.py --data_dir DATA_DIR --proxy_minutes 8

Writes `benchmarks/results/ablations.{json,md}`. Each recipe is pretrained for the same proxy budget of *its own*
calibrated throughput (so a slower recipe gets fewer steps, as it would under a wall-clock budget; see
`benchmarks/common.py`), its features are extracted once (bf16, fixed noise, all blocks), and MSFA is trained in both
cross-source directions. The score that chooses is the MSFA accuracy on the **validation** part carved from each
direction's training side (near-duplicate groups on one side), averaged over the two directions; test accuracies are
written for information and never used.

Search (greedy, decided by the script from the validation scores):
1. learning rate: the paper's Adam 1e-4 with linear decay against 5e-4 with warm-up and cosine decay;
2. on the better one, one lever at a time: timesteps below 300 only, timesteps skewed to low noise (power 2),
   crop + intensity augmentation, EMA weights, x0 (sample) prediction;
3. the levers that beat step 2's starting point, combined (of the two timestep levers, the better one);
4. a second round on the recipe steps 1-3 chose, one lever at a time (each overrides the flag it shares with the
   recipe) and the winners combined: the half-width UNet (`small`, about 2.2x the images per CPU-minute), timesteps
   skewed further (power 3), a learning rate of 1e-3;
5. a third round the same way on step 4's choice: the quarter-width UNet (`mini`, about 1.6x the images per
   CPU-minute of `small`), a learning rate of 2e-3, EMA weights (the proxy budget now has about twice the steps
   of the first round's EMA row), a batch of 64;
6. a fourth round the same way on step 5's choice, where one seed no longer decides: v-prediction, brightness /
   contrast / gamma jitter alone (the cross-source shift is largely one of contrast; step 2 tried it only with
   crops), timesteps skewed further (power 3, tried in step 4 on the `base` UNet only). A lever that beats its
   starting point with seed 0 is pretrained again with seed 1 and kept only if the mean of its two seeds beats the
   starting point's (the rounds before decided differences of about one standard error on one seed);
7. a fifth round the same way (two seeds for a winner) on step 6's choice: min-SNR-5 loss weighting (Hang et al.
   2023, diffusers' `--snr_gamma`), which down-weights the low noise levels the timestep skew favours (it trains
   its starting recipe's steps: same compute); self-conditioning (Chen et al. 2023; DDAE++), the UNet's own
   clean-image estimate as a second input (about 1.15x the compute of a step, so fewer steps; twice the forwards
   of a read-out);
8. a sixth round the same way (two seeds for a winner) on step 7's choice, both of the same compute as their
   starting recipe (so they train its steps): the cosine noise schedule (`--ddpm_beta_schedule squaredcos_cap_v2`,
   far less noise than the linear one at every read-out timestep: alpha_bar 0.85 against 0.52 at t = 250; Chen et
   al. 2024 gained from a schedule with more clean steps), and the loss weighted by each image's signal share
   alpha_bar_t (`--signal_weighting`: towards clean steps, the opposite of min-SNR);
9. a seventh round the same way (two seeds for a winner) on step 8's choice, aimed at what separates the sources'
   near-duplicates (`benchmarks/results/mirror_invariance.md`: re-framed and mirrored copies of the same slices):
   random resized crops alone (`--random_crop_scale 0.6`, as the contrastive baselines; step 2 tried them only with
   intensity jitter, on the `base` UNet), and convolution kernels kept left-right symmetric
   (`--mirror_symmetric_kernels`: the pooled features of an image and of its mirror image then nearly agree); both
   train their starting recipe's steps (a batched resampling, a weight average after each step: negligible compute);
10. an eighth round the same way (two seeds for a winner) on step 9's choice: a batch of 16 (twice the steps per
   CPU-minute at about the same images/s: 3,436 steps against 1,742; the batch of 64 lost 1.2 points in step 5
   with half the steps). It is of another compute than its start, whose calibration was measured in an earlier
   session on a machine about twice as fast as later ones: it is measured back to back with its start on one machine
   and its steps scaled to the start's recorded speed (`calibrate(reference=)` in `benchmarks/common.py`), so that
   it trains the steps its start's machine would have given it;
11. a ninth round the same way (two seeds for a winner) on step 10's choice, regularisers aimed at the cross-source
   drop (in-source validation far above the cross-source test accuracy): AdamW weight decay 0.05, the contrastive
   baselines' value (the same steps), and dropout 0.1 in the UNet's ResNet blocks (`--unet_dropout`, DDPM's value;
   about 1.2x the time per step, so measured back to back with its start as in step 10);
12. read-out on the chosen recipe: the timestep sweep, several noise draws per image, test-time flip averaging
   (each image and its mirror image, noised alike), average + max pooling of each block, and that pooling with a
   probe trained on randomly mirrored training images (`random_flip`, as in the linear evaluation of MoCo, BYOL and
   SimCLR; aimed at the mirrored near-duplicates of `mirror_invariance.md`; inference unchanged) (the benchmark
   would apply any of them to the baselines alike). Read-outs
   differ in cost (UNet forwards per image), so the cheapest one within `READOUT_TOLERANCE` of the best validation
   accuracy is chosen: a 4x slower extraction must earn more than a tie;
13. a seed check, for information only: the chosen recipe pretrained again with seed 1 and read out with the chosen
   read-out and with the sweep, to show how much of a difference between rows one seed can make.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (DEFAULT_DATA_DIR, DIRECTIONS, MAX_IMAGES_HELP, OVERWRITE_HELP, REPO, Benchmark,  # noqa: E402
                    HelpFormatter, cached_extract, check_recorded_results, environment_info, machine_line,
                    output_prefix, positive_float, positive_int, pretrain_for_budget, probe_protocol, provenance,
                    rendered_lines, restore_calibration, run_main, slug, unet_config, writable_folder, write_results)
from mic_diffrep.features import DiffusionFeatureExtractor, FeatureArguments  # noqa: E402
from mic_diffrep.probing import ProbeConfig  # noqa: E402


logger = logging.getLogger("benchmark")

# What every recipe starts from: the paper's settings, spelled out so that a recipe means the same whatever the
# package defaults are (they are the recipe this search chose); a recipe's flags replace these.
PAPER_FLAGS = ["--learning_rate", "1e-4", "--lr_scheduler", "linear", "--lr_warmup_steps", "0",
               "--timestep_power", "1"]
LEARNING_RATES = {
    "paper": [],  # Adam 1e-4, linear decay, no warm-up (the paper's recipe at 64 px)
    "lr-5e-4": ["--learning_rate", "5e-4", "--lr_scheduler", "cosine", "--lr_warmup_steps", "100"],
}
LEVERS = {
    "t<300": ["--max_train_timestep", "300"],
    "t-power-2": ["--timestep_power", "2"],
    "augment": ["--random_crop_scale", "0.6", "--intensity_jitter"],
    "ema": ["--use_ema"],
    "x0": ["--prediction_type", "sample"],
}
SECOND_ROUND = {
    "unet-small": ["--model_config_name_or_path", "small"],
    "t-power-3": ["--timestep_power", "3"],
    "lr-1e-3": ["--learning_rate", "1e-3"],
}
THIRD_ROUND = {
    "unet-mini": ["--model_config_name_or_path", "mini"],
    "lr-2e-3": ["--learning_rate", "2e-3"],
    "ema": ["--use_ema"],
    "batch-64": ["--train_batch_size", "64"],
}
FOURTH_ROUND = {
    "v-prediction": ["--prediction_type", "v_prediction"],
    "intensity-jitter": ["--intensity_jitter"],
    "t-power-3": ["--timestep_power", "3"],
}
FIFTH_ROUND = {
    "min-snr-5": ["--snr_gamma", "5"],
    "self-conditioning": ["--self_conditioning"],
}
SIXTH_ROUND = {
    "cosine-schedule": ["--ddpm_beta_schedule", "squaredcos_cap_v2"],
    "signal-weighting": ["--signal_weighting"],
}
SEVENTH_ROUND = {
    "random-crop": ["--random_crop_scale", "0.6"],
    "mirror-symmetric": ["--mirror_symmetric_kernels"],
}
EIGHTH_ROUND = {
    "batch-16": ["--train_batch_size", "16"],
}
# Regularisers aimed at the cross-source drop (validation in-source is far above the cross-source test accuracy):
# AdamW's decoupled weight decay at the contrastive baselines' value, and dropout in the ResNet blocks (DDPM's 0.1).
NINTH_ROUND = {
    "weight-decay-0.05": ["--adam_weight_decay", "0.05"],
    "dropout-0.1": ["--unet_dropout", "0.1"],
}
# Levers that change the loss, the noise levels, the training images or a constraint on the weights, not the compute
# of a step (or by a negligible amount): they train the steps of their starting recipe's calibration (a calibration of
# their own would add the machine's speed noise, up to 12% here, to the comparison).
SAME_COMPUTE = {"min-snr-5", "cosine-schedule", "signal-weighting", "random-crop", "mirror-symmetric",
                "weight-decay-0.05"}
# Levers of another compute per step, from the eighth round on: measured back to back with their starting recipe and
# their steps scaled to its recorded calibration (it was measured in an earlier session, on a faster machine).
MEASURED_AGAINST_START = {"batch-16", "dropout-0.1"}
# The rounds after step 3, each on the recipe chosen before it: stage -> (its command-line flag, its levers, whether a
# lever that wins with seed 0 must win again on the mean of seeds 0 and 1).
ROUNDS = {"4 second round": ("second_round", SECOND_ROUND, False),
          "5 third round": ("third_round", THIRD_ROUND, False),
          "6 fourth round": ("fourth_round", FOURTH_ROUND, True),
          "7 fifth round": ("fifth_round", FIFTH_ROUND, True),
          "8 sixth round": ("sixth_round", SIXTH_ROUND, True),
          "9 seventh round": ("seventh_round", SEVENTH_ROUND, True),
          "10 eighth round": ("eighth_round", EIGHTH_ROUND, True),
          "11 ninth round": ("ninth_round", NINTH_ROUND, True)}
EXCLUSIVE = [("t<300", "t-power-2")]  # the same lever twice: only the better one is combined
SWEEP_TIMESTEPS = [10, 25, 50, 100, 250]
# Every read-out spelled out from average pooling (as the recipes are from PAPER_FLAGS), so that a row means the same
# whatever the package's default read-out is (it is the one this search chose).
READOUTS = {
    "sweep 10-250": FeatureArguments(timesteps=SWEEP_TIMESTEPS, pooling="avg"),
    "sweep 0-250": FeatureArguments(timesteps=[0, 5, 10, 25, 50, 100, 250], pooling="avg"),
    "4 noise draws": FeatureArguments(timesteps=SWEEP_TIMESTEPS, num_noise_samples=4, pooling="avg"),
    "flip average": FeatureArguments(timesteps=SWEEP_TIMESTEPS, flip_average=True, pooling="avg"),
    "avg+max pooling": FeatureArguments(timesteps=SWEEP_TIMESTEPS, pooling="avgmax"),
    "avg+max pooling, probe flips": FeatureArguments(timesteps=SWEEP_TIMESTEPS, pooling="avgmax"),
    "2x2 grid pooling": FeatureArguments(timesteps=SWEEP_TIMESTEPS, pooling="grid", pooling_grid_size=2),
}
# Read-outs whose probe trains on each training image or, at random, its mirror image (`ProbeConfig.random_flip`):
# the read-out whose features (and their mirror images') they use. Inference is unchanged, so is their cost.
PROBE_FLIPS = {"avg+max pooling, probe flips": "avg+max pooling"}

# A read-out within this much mean validation accuracy of the best is as good: the cheapest such one is chosen.
READOUT_TOLERANCE = 0.005


def merge_flags(*flag_lists: List[str]) -> List[str]:
    """Command-line flags in order, a later value of a flag replacing an earlier one.

    >>> merge_flags(["--learning_rate", "5e-4", "--use_ema"], ["--learning_rate", "1e-3"])
    ['--learning_rate', '1e-3', '--use_ema']
    """
    values: Dict[str, List[str]] = {}
    for flags in flag_lists:
        for i, token in enumerate(flags):
            if token.startswith("--"):
                values[token] = [v for v in flags[i + 1 : i + 2] if not v.startswith("--")]
    return [token for flag, value in values.items() for token in [flag, *value]]


def readout_cost(readout: str) -> int:
    """UNet forwards per image."""
    args = READOUTS[readout]
    return len(args.timesteps) * args.num_noise_samples * (2 if args.flip_average else 1)


def choose_readout(scores: Dict[str, float]) -> str:
    """The cheapest read-out whose validation accuracy is within `READOUT_TOLERANCE` of the best.

    >>> choose_readout({"sweep 10-250": 0.900, "4 noise draws": 0.901})
    'sweep 10-250'
    """
    best = max(scores.values())
    good = [readout for readout, score in scores.items() if score >= best - READOUT_TOLERANCE]
    return min(good, key=lambda readout: (readout_cost(readout), -scores[readout]))


def validation_standard_error(sizes: Dict[str, int], accuracy: float) -> float:
    """Binomial standard error of the mean of per-direction validation accuracies near `accuracy`.

    >>> round(validation_standard_error({"a": 400, "b": 400}, 0.9), 4)
    0.0106
    """
    variances = [accuracy * (1 - accuracy) / n for n in sizes.values()]
    return float(np.sqrt(sum(variances)) / len(variances))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--work_dir", type=writable_folder,
                        default=os.path.join(REPO, "runs", "benchmark"), help="Models and caches.")
    parser.add_argument("--output", type=output_prefix,
                        default=os.path.join(REPO, "benchmarks", "results", "ablations"))
    parser.add_argument("--proxy_minutes", type=positive_float, default=8.0, help="Pretraining budget of every recipe.")
    parser.add_argument("--resolution", type=positive_int, default=64)
    parser.add_argument("--unet", type=unet_config, default="base",
                        help="UNet preset or config of every recipe that does not set one ('mini' for smoke runs: at "
                             "64 px 'tiny' is slower, its attention at 32x32).")
    parser.add_argument("--max_images", type=positive_int, default=None, help=MAX_IMAGES_HELP)
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS),
                        help="The levers of step 2 (all by default; the results file lists those left out).")
    for stage, (flag, levers, _) in ROUNDS.items():
        parser.add_argument(f"--{flag}", nargs="*", default=list(levers), choices=list(levers),
                            help=f"The levers of step {stage.split()[0]} (all by default).")
    parser.add_argument("--reuse_results", action="store_true",
                        help="Take the rows already in OUTPUT.json (same recipe, flags, read-out and budget) instead "
                             "of probing again: re-decides the search from what was measured.")
    parser.add_argument("--remeasure", nargs="+", default=[], choices=list(READOUTS), metavar="READOUT",
                        help="With --reuse_results: measure these read-outs' rows again instead of taking them from "
                             "OUTPUT.json (after a change to how that read-out extracts features).")
    parser.add_argument("--note", default="", help="A sentence for the results file (e.g. what else ran).")
    parser.add_argument("--overwrite_output", action="store_true", help=OVERWRITE_HELP)
    args = parser.parse_args()
    if args.remeasure and not args.reuse_results:
        parser.error("--remeasure drops rows of OUTPUT.json: give --reuse_results too.")
    return args


def measured_on(args) -> Dict:
    """What the rows of a run depend on beside their recipes (a results file written before recorded them as the
    defaults: the base UNet, every image)."""
    return {"unet": args.unet, "max_images": args.max_images}


def reusable_rows(args) -> List[Dict]:
    """With `--reuse_results`, the rows of OUTPUT.json measured at the same budget, resolution, UNet and images (a
    smoke run's `--max_images` rows are not reused as the real ones), less those of the read-outs to
    `--remeasure`."""
    previous = _recorded(args)
    if previous is None:
        return []
    if not _same_settings(previous, args):
        logger.warning("%s.json was measured with other settings (proxy minutes, resolution, UNet or --max_images): "
                       "none of its rows is reused.", args.output)
        return []
    return [row for row in previous["rows"] if row["readout"] not in args.remeasure]


def _recorded(args) -> Optional[Dict]:
    """OUTPUT.json, with `--reuse_results` (else `None`)."""
    if not (args.reuse_results and os.path.isfile(args.output + ".json")):
        return None
    with open(args.output + ".json") as f:
        return json.load(f)


def _same_settings(previous: Dict, args) -> bool:
    recorded = {"unet": previous.get("unet", "base"), "max_images": previous.get("max_images")}
    return (previous["proxy_minutes"], previous["resolution"], recorded) == (args.proxy_minutes, args.resolution,
                                                                             measured_on(args))


def levers_left_out(args) -> List[str]:
    """The levers `--levers` and the rounds' flags leave out of the search."""
    left_out = [lever for lever in LEVERS if lever not in args.levers]
    return left_out + [lever for flag, levers, _ in ROUNDS.values() for lever in levers
                       if lever not in getattr(args, flag)]


def kept_rows(args) -> int:
    """How many rows of OUTPUT.json a run keeps: with `--reuse_results`, every one measured with its settings (those
    of `--remeasure` are measured again), else none."""
    previous = _recorded(args)
    return len(previous["rows"]) if previous is not None and _same_settings(previous, args) else 0


def row_key(row: Dict) -> Tuple:
    """What identifies a measured row: its recipe (name and flags), read-out and pretraining seed."""
    return row["recipe"], tuple(row["flags"]), row["readout"], row.get("seed", 0)


def run_name(recipe: str) -> str:
    """The pretraining run (and calibration) name of an ablation recipe."""
    return "ablation-" + slug(recipe)


class Ablation:
    def __init__(self, args):
        self.args = args
        self.bench = Benchmark(args.data_dir, args.work_dir, args.resolution, max_images=args.max_images)
        self.splits = {direction: self.bench.split(direction) for direction, _ in DIRECTIONS}
        self.config = ProbeConfig()
        self.rows: List[Dict] = []
        self.previous = reusable_rows(args)
        recorded = _recorded(args) if self.previous else None
        self.recorded = recorded or {}  # OUTPUT.json, when its rows are reused: its machine and note
        self.measured = 0  # rows measured by this run (none: a re-render, which keeps the recorded machine)

    def evaluate(self, stage: str, name: str, recipe: List[str], readout: str = "sweep 10-250", seed: int = 0,
                 calibrated_as: Optional[Tuple[str, List[str]]] = None,
                 calibrated_against: Optional[Tuple[str, List[str]]] = None) -> Dict:
        """Pretrains recipe `name` (or reuses its run), extracts its features with `readout` and probes both
        directions; `calibrated_as=(name, flags)`: the recipe of equal compute whose calibrated steps it trains;
        `calibrated_against=(name, flags)`: the recipe of a recorded calibration it is measured against."""
        key = (name, tuple(recipe), readout, seed)
        for row in self.rows:  # measured earlier in this search (e.g. a seed the seed check needs again)
            if row_key(row) == key:
                return row
        for row in self.previous:
            if row_key(row) == key:
                logger.info("%s / %s / %s: validation %.4f (from the results file)", stage, name, readout,
                            row["validation_accuracy"])
                self.rows.append(dict(row, stage=stage))
                return self.rows[-1]
        # on a fresh machine, a recipe measured before (or the one whose steps it shares) trains the recorded steps
        self.restore_calibration(*(calibrated_as or (name, recipe)))
        if calibrated_against:
            self.restore_calibration(*calibrated_against)

        def as_run(other: Optional[Tuple[str, List[str]]]):  # (recipe, flags) -> (its run name, its training argv)
            return other and (run_name(other[0]), self.recipe_argv(other[1]))

        run = pretrain_for_budget("micdiffrep", self.args.proxy_minutes, self.args.work_dir, self.args.data_dir,
                                  self.args.resolution, seed=seed, recipe_argv=self.recipe_argv(recipe),
                                  name=run_name(name), calibrated_as=as_run(calibrated_as),
                                  calibrated_against=as_run(calibrated_against))
        seed_run = run_name(name) + (f"-seed{seed}" if seed else "")
        extractor = DiffusionFeatureExtractor.from_pretrained(run["output_dir"], dtype=torch.bfloat16)
        extractor.pipeline.set_progress_bar_config(disable=True)
        cache_name = f"{seed_run}-{slug(PROBE_FLIPS.get(readout, readout))}"
        features, speed = cached_extract(extractor, self.bench, READOUTS[readout], cache_name)
        mirrored, config = None, self.config
        if readout in PROBE_FLIPS:
            mirrored = cached_extract(extractor, self.bench, READOUTS[readout], cache_name, mirrored=True)[0]
            config = dataclasses.replace(self.config, random_flip=True)
        row = {"stage": stage, "recipe": name, "flags": recipe, "readout": readout, "seed": seed,
               "steps": run["summary"]["global_step"], "planned_steps": run["planned_steps"],
               "images_per_second": run["calibration"]["images_per_second"],
               "train_minutes": run["summary"]["train_minutes"], "final_loss": run["summary"]["final_loss"],
               "feature_images_per_second": speed}
        if calibrated_as:
            row["calibrated_as"] = calibrated_as[0]
        if calibrated_against:
            row["calibrated_against"] = calibrated_against[0]
            row["machine_speed"] = run["calibration"].get("reference", {}).get("machine_speed")
        for direction, split in self.splits.items():
            results = probe_protocol(features, self.bench, split, config, mirrored)
            msfa = results["msfa"]
            row[direction] = {"validation_accuracy": msfa["validation_accuracy"],
                              "test_accuracy": msfa["test"]["all"]["accuracy"],
                              "test_accuracy_deduplicated": msfa["test"]["deduplicated"]["accuracy"],
                              "layers": msfa["layers"], "timesteps": msfa["timesteps"]}
        row["validation_accuracy"] = float(np.mean([row[d]["validation_accuracy"] for d, _ in DIRECTIONS]))
        logger.info("%s / %s / %s: validation %.4f", stage, name, readout, row["validation_accuracy"])
        self.rows.append(row)
        self.measured += 1
        self.save()
        return row

    def restore_calibration(self, name: str, recipe: List[str]) -> None:
        """On a machine without the search's calibrations, restore recipe `name`'s from its recorded seed-0 row, so
        that a lever of the same compute trains the steps that row did."""
        recorded = [row for row in self.previous + self.rows
                    if (row["recipe"], row["flags"], row.get("seed", 0)) == (name, recipe, 0)]
        if recorded:
            restore_calibration("micdiffrep", run_name(name), self.args.work_dir, self.args.data_dir,
                                self.args.resolution, self.recipe_argv(recipe), recorded[0]["planned_steps"],
                                self.args.proxy_minutes, recorded[0]["images_per_second"], self.args.output + ".json")

    def recipe_argv(self, recipe: List[str]) -> List[str]:
        return merge_flags(PAPER_FLAGS, ["--model_config_name_or_path", self.args.unet], recipe)

    def save(self, chosen: Dict = None) -> Dict:
        """Write the results file; called after every recipe so an interrupted search keeps what it measured, and the
        reused rows it has not reached yet (the finished search writes only the rows it reached)."""
        rows = self.rows
        if chosen is None:
            reached = {row_key(row) for row in self.rows}
            rows = self.rows + [row for row in self.previous if row_key(row) not in reached]
        left_out = levers_left_out(self.args)
        # a re-render (every row reused) keeps the machine its rows were measured on, and its note unless given one
        recorded = self.recorded if not self.measured else {}
        result = {**provenance(recorded, self.measured),
                  "environment": recorded.get("environment") or environment_info(), "resolution": self.args.resolution,
                  "proxy_minutes": self.args.proxy_minutes, **measured_on(self.args),
                  "note": self.args.note or recorded.get("note", ""),
                  "levers_left_out": left_out,
                  "validation_images": {d: int(split["validation_mask"].sum()) for d, split in self.splits.items()},
                  "rows": rows, "chosen": chosen}
        write_results(self.args.output, result, markdown(result))
        return result

    def search(self) -> Dict:
        # 1. Learning rate.
        lr_rows = {name: self.evaluate("1 learning rate", name, flags) for name, flags in LEARNING_RATES.items()}
        start = max(lr_rows, key=lambda n: lr_rows[n]["validation_accuracy"])
        base_flags, base_score = LEARNING_RATES[start], lr_rows[start]["validation_accuracy"]
        # 2. One lever at a time on top of it.
        levers = {lever: LEVERS[lever] for lever in self.args.levers}
        lever_rows = {lever: self.evaluate("2 one lever", f"{start} + {lever}", base_flags + flags)
                      for lever, flags in levers.items()}
        winners = [lever for lever in levers if lever_rows[lever]["validation_accuracy"] > base_score]
        for group in EXCLUSIVE:
            both = [lever for lever in group if lever in winners]
            for lever in sorted(both, key=lambda n: lever_rows[n]["validation_accuracy"])[:-1]:
                winners.remove(lever)
        candidates = {start: (base_flags, base_score)}
        candidates.update({f"{start} + {lever}": (base_flags + LEVERS[lever], lever_rows[lever]["validation_accuracy"])
                           for lever in winners})
        # 3. The winning levers together.
        if len(winners) > 1:
            name = f"{start} + " + " + ".join(winners)
            flags = base_flags + [flag for lever in winners for flag in LEVERS[lever]]
            candidates[name] = (flags, self.evaluate("3 combined", name, flags)["validation_accuracy"])
        chosen = max(candidates, key=lambda n: candidates[n][1])
        # 4-11. Further rounds, each on top of the recipe chosen so far.
        for stage, (flag, levers, confirm) in ROUNDS.items():
            wanted = getattr(self.args, flag)
            chosen, candidates = self.round(stage, chosen, candidates[chosen],
                                            {lever: flags for lever, flags in levers.items() if lever in wanted},
                                            confirm)
        # 12. Read-out on the chosen recipe.
        readout_rows = {}
        for readout in READOUTS:
            existing = [r for r in self.rows if r["recipe"] == chosen and r["readout"] == readout]
            readout_rows[readout] = existing[0] if existing else self.evaluate("12 read-out", chosen,
                                                                               candidates[chosen][0], readout)
        readout = choose_readout({r: row["validation_accuracy"] for r, row in readout_rows.items()})
        # 13. How much a second pretraining seed moves the chosen recipe's scores (for information; chooses nothing).
        for seed_readout in dict.fromkeys([readout, "sweep 10-250"]):
            self.evaluate("13 seed check", chosen, candidates[chosen][0], seed_readout, seed=1)
        return {"recipe": chosen, "flags": candidates[chosen][0], "readout": readout,
                "readout_settings": {"timesteps": READOUTS[readout].timesteps,
                                     "num_noise_samples": READOUTS[readout].num_noise_samples,
                                     "flip_average": READOUTS[readout].flip_average,
                                     "pooling": READOUTS[readout].pooling,
                                     "probe_random_flip": readout in PROBE_FLIPS},
                "validation_accuracy": readout_rows[readout]["validation_accuracy"]}

    def round(self, stage: str, start: str, start_recipe, levers: Dict[str, List[str]], confirm: bool = False):
        """One lever at a time on top of `start` (each overrides the flags it shares with it), then the winners
        together; returns the best recipe's name and every candidate's `(flags, validation accuracy)`. With `confirm`,
        a lever that wins with seed 0 is run again with seed 1 and scored by the mean of both seeds, against the
        mean of `start`'s two seeds."""
        base_flags, base_score = start_recipe

        def calibration(lever: str) -> Dict:
            if lever in SAME_COMPUTE:
                return {"calibrated_as": (start, base_flags)}
            if lever in MEASURED_AGAINST_START:
                return {"calibrated_against": (start, base_flags)}
            return {}

        scores = {lever: self.evaluate(stage, f"{start} + {lever}", merge_flags(base_flags, flags),
                                       **calibration(lever))["validation_accuracy"]
                  for lever, flags in levers.items()}
        if confirm and any(score > base_score for score in scores.values()):
            # the mean of `start`'s seed-0 and seed-1 rows (recorded ones reused): `base_score` may be that mean
            # already (a start chosen in a confirmed round), which averaged with seed 1 again counted it twice
            base_score = (self.evaluate(stage, start, base_flags)["validation_accuracy"]
                          + self.evaluate(stage, start, base_flags, seed=1)["validation_accuracy"]) / 2
            for lever in [lever for lever, score in scores.items() if score > start_recipe[1]]:
                again = self.evaluate(stage, f"{start} + {lever}", merge_flags(base_flags, levers[lever]), seed=1,
                                      **calibration(lever))
                scores[lever] = (scores[lever] + again["validation_accuracy"]) / 2
        winners = [lever for lever in scores if scores[lever] > base_score]
        candidates = {start: (base_flags, base_score)}
        candidates.update({f"{start} + {lever}": (merge_flags(base_flags, levers[lever]), scores[lever])
                           for lever in winners})
        if len(winners) > 1:
            name = f"{start} + " + " + ".join(winners)
            flags = merge_flags(base_flags, *[levers[lever] for lever in winners])
            score = self.evaluate(stage.split()[0] + " combined", name, flags)["validation_accuracy"]
            if confirm:
                score = (score + self.evaluate(stage.split()[0] + " combined", name, flags, seed=1)[
                    "validation_accuracy"]) / 2
            candidates[name] = (flags, score)
        return max(candidates, key=lambda n: candidates[n][1]), candidates


def markdown(result: Dict) -> str:
    env, chosen = result["environment"], result["chosen"]
    unet = ("Every recipe: the `base` UNet (4.3M parameters; `unet-small`: the 1.1M `small` one; `unet-mini`: the "
            "0.27M `mini` one) at " if result.get("unet", "base") == "base" else
            f"Every recipe that sets no UNet: the `{result['unet']}` UNet, at ")
    smoke = (f" **Smoke run**: probed on a random subset of {result['max_images']} images (`--max_images`)."
             if result.get("max_images") else "")
    lines = [
        "# Ablations: which recipe and read-out to ship", "",
        f"Command: `{result['command']}`  ",
        machine_line(env, ("torch", "diffusers")),
        "",
        *rendered_lines(result),
        unet + f"{result['resolution']} px, bf16, pretrained on the 5,708 unlabelled training "
        f"images for {result['proxy_minutes']:g} minutes of its own calibrated throughput (steps fixed before "
        "training; `benchmarks/common.py`). Features: all blocks, fixed noise, bf16. Probe: the paper's MSFA protocol. "
        "**val** = MSFA accuracy on the validation part carved from the training side of each cross-source "
        "direction (near-duplicate groups on one side), the only number used to choose; *test* and *dedup* are "
        "reported for information only." + smoke, "",
    ]
    if result.get("note"):
        lines += [result["note"], ""]
    if result.get("validation_images") and result["rows"]:
        sizes = result["validation_images"]
        accuracy = chosen["validation_accuracy"] if chosen else max(r["validation_accuracy"] for r in result["rows"])
        error = validation_standard_error(sizes, accuracy)
        lines += ["How far apart two rows must be to differ: the validation parts hold "
                  + " and ".join(f"{n:,} images ({d})" for d, n in sizes.items())
                  + f", so the mean validation accuracy has a binomial standard error of about {100 * error:.1f} "
                  "points (and MSFA's layer choice is made on the same images, which flatters every row alike). "
                  "Differences below about twice that are within noise; the search still takes the higher score.", ""]
    if result.get("levers_left_out"):
        lines += ["Levers left out in this run (`--levers`, " + ", ".join(f"`--{flag}`" for flag, _, _ in ROUNDS.values())
                  + "): "
                  + ", ".join(result["levers_left_out"]) + ".", ""]
    lines += ["| stage | recipe | read-out | steps | images/s | val (mean) | val sartaj->other | val other->sartaj "
              "| *test s->o (dedup)* | *test o->s (dedup)* |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        recipe = r["recipe"] + (f" (seed {r['seed']})" if r.get("seed") else "") + (
            " (its start's steps)" if r.get("calibrated_as") else "") + (
            " (steps scaled to its start's speed)" if r.get("calibrated_against") else "")
        cells = [r["stage"], recipe, r["readout"], str(r["steps"]), f"{r['images_per_second']:.1f}",
                 f"**{r['validation_accuracy']:.3f}**"]
        cells += [f"{r[d]['validation_accuracy']:.3f}" for d, _ in DIRECTIONS]
        cells += [f"*{r[d]['test_accuracy']:.3f} ({r[d]['test_accuracy_deduplicated']:.3f})*" for d, _ in DIRECTIONS]
        lines.append("| " + " | ".join(cells) + " |")
    if chosen is None:
        return "\n".join(lines + ["", "**Search not finished**: the rows above are what it measured so far.", ""])
    lines += ["", f"**Chosen on validation:** recipe `{chosen['recipe']}` (flags: `{' '.join(chosen['flags']) or 'none'}`), "
              f"read-out `{chosen['readout']}` (timesteps {chosen['readout_settings']['timesteps']}, "
              f"{chosen['readout_settings']['num_noise_samples']} noise draw(s)"
              f"{', flip-averaged' if chosen['readout_settings'].get('flip_average') else ''}, "
              f"{chosen['readout_settings'].get('pooling', 'avg')} pooling"
              f"{', probe trained on random mirror images' if chosen['readout_settings'].get('probe_random_flip') else ''}"
              "); mean validation "
              "accuracy "
              f"{chosen['validation_accuracy']:.3f}. Read-outs: the cheapest (fewest UNet forwards per image) within "
              f"{100 * READOUT_TOLERANCE:g} points of the best validation accuracy.", ""]
    return "\n".join(lines + seed_check(result["rows"]) + validation_test_agreement(result["rows"]))


def rank_correlation(x: List[float], y: List[float]) -> float:
    """Spearman's rank correlation (ties share their mean rank).

    >>> rank_correlation([0.1, 0.2, 0.3], [3, 5, 4])
    0.5
    """
    def ranks(values):
        values = np.asarray(values, dtype=float)
        order = values.argsort(kind="stable")
        result = np.empty(len(values))
        result[order] = np.arange(len(values), dtype=float)
        for value in np.unique(values):
            result[values == value] = result[values == value].mean()
        return result

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def validation_test_agreement(rows: List[Dict]) -> List[str]:
    """Lines saying how well each direction's validation accuracy ranks its test accuracies, over the recipe rows
    (one read-out) and over the read-out rows (one recipe); for information, it chooses nothing."""
    groups = {"recipes (read-out `sweep 10-250`, seed 0)":
              [r for r in rows if r["readout"] == "sweep 10-250" and not r.get("seed")]}
    chosen_recipe = [r["recipe"] for r in rows if r["stage"].endswith("read-out")]
    if chosen_recipe:
        groups["read-outs (the chosen recipe, seed 0)"] = [
            r for r in rows if r["recipe"] == chosen_recipe[0] and not r.get("seed")]
    lines = []
    for label, group in groups.items():
        if len(group) < 3:
            continue
        cells = []
        for direction, _ in DIRECTIONS:
            validation = [r[direction]["validation_accuracy"] for r in group]
            cells += [f"{rank_correlation(validation, [r[direction][key] for r in group]):+.2f}"
                      for key in ("test_accuracy", "test_accuracy_deduplicated")]
        lines.append(f"| {label} | {len(group)} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    return ["**Does validation rank the rows as the test images do?** (for information, it chooses nothing) Spearman "
            "rank correlation between each direction's validation accuracy and its test accuracy, over rows that "
            "differ in one respect:", "",
            "| rows | n | s->o test | s->o dedup | o->s test | o->s dedup |", "|---|---|---|---|---|---|",
            *lines, ""]


def seed_check(rows: List[Dict]) -> List[str]:
    """Lines comparing the seed-1 rows with the seed-0 rows of the same recipe and read-out."""
    lines = []
    for again in [r for r in rows if r.get("seed")]:
        first = [r for r in rows if not r.get("seed") and (r["recipe"], r["flags"], r["readout"]) == (
            again["recipe"], again["flags"], again["readout"])]
        if first:
            change = 100 * (again["validation_accuracy"] - first[0]["validation_accuracy"])
            lines.append(f"- `{again['recipe']}`, read-out `{again['readout']}`: mean validation "
                         f"{first[0]['validation_accuracy']:.3f} with "
                         f"seed 0, {again['validation_accuracy']:.3f} with seed {again['seed']} ({change:+.1f} points)")
    if not lines:
        return []
    return ["**Seeds**: recipes pretrained again with another seed (initial weights, data order, noise and "
            "timesteps), the rest unchanged (the confirmations of the fourth round and after, and the seed check, "
            "which chooses nothing):", "", *lines, ""]


def main():
    args = parse_args()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    kept = kept_rows(args)
    check_recorded_results(args.output, args.overwrite_output, kept, reusable=True)
    if kept and levers_left_out(args) and not args.overwrite_output:  # the finished search keeps the rows it reaches
        raise SystemExit(f"ablations.py: error: {args.output}.json holds rows of levers this run leaves out "
                         f"({', '.join(levers_left_out(args))}), which the finished search would drop: give another "
                         f"--output, or --overwrite_output; nothing was written.")
    ablation = Ablation(args)
    result = ablation.save(ablation.search())
    print(markdown(result))


if __name__ == "__main__":
    run_main(main)
