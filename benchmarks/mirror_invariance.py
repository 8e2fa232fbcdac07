#!/usr/bin/env python
"""Where the cross-source gap on all test images comes from: test images that are mirrored near-duplicates of
training images, and how each method's features treat a left-right mirrored image.

    python benchmarks/mirror_invariance.py --data_dir DATA_DIR --seed 3

Writes `benchmarks/results/mirror_invariance.{json,md}`:

1. **The test sets**: per cross-source direction, the test images with a near-duplicate in the training side
   (`mic_diffrep.leakage`, as the benchmark's *dedup* column) and how many of them match it only as a mirror image.
2. **All = duplicated + de-duplicated**: each method's accuracy on the test images with a near-duplicate in
   training, worked out from the recorded points (`--points`, the budget curve's all and de-duplicated accuracies
   and the two subsets' sizes), so the gap on all test images splits into its two parts.
3. **Mirror invariance, on validation only**: for the `--seed` runs of `--minutes` (trained by `budget_curve.py` in
   the same work folder; this script trains nothing), MSFA fitted on the fit part of the training side and scored
   on the validation part as it is and mirrored left-right; and the same for test-time flip averaging (`--flip_average`
   features: an image's and its mirror's averaged), which is mirror-invariant by construction. Test accuracies are
   reported for information; nothing here chooses a read-out.
"""

import argparse
import json
import logging
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from budget_curve import METHODS  # noqa: E402
from common import (DEFAULT_DATA_DIR, DIRECTIONS, OVERWRITE_HELP, REPO, Benchmark, HelpFormatter,  # noqa: E402
                    budget_run_dir, cached_extract, check_recorded_results, environment_info, feature_cache_name,
                    load_extractor, machine_line, method_recipe, output_prefix, positive_float, probe_protocol,
                    provenance, readout_arguments, rendered_lines, run_main, writable_folder, write_results)
from mic_diffrep.leakage import check_leakage  # noqa: E402
from mic_diffrep.models.mic_diffrep.unet_features import concatenate_features  # noqa: E402
from mic_diffrep.probing import ProbeConfig  # noqa: E402
from mic_diffrep.probing.heads import accuracy, train_heads  # noqa: E402


logger = logging.getLogger("benchmark")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--work_dir", type=writable_folder, default=os.path.join(REPO, "runs", "benchmark"))
    parser.add_argument("--minutes", type=positive_float, default=30.0, help="Budget of the runs probed (part 3).")
    parser.add_argument("--seed", type=int, default=0, help="Pretraining seed of the runs probed (part 3).")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--points", default=os.path.join(REPO, "benchmarks", "results", "seeds_30min.json"),
                        help="Results file of budget_curve.py whose recorded points part 2 splits.")
    parser.add_argument("--output", type=output_prefix,
                        default=os.path.join(REPO, "benchmarks", "results", "mirror_invariance"))
    parser.add_argument("--reuse_results", action="store_true",
                        help="Take the test sets' composition and the probed runs (same budget and seed) from "
                             "OUTPUT.json: redo part 2 from --points, and only what is missing. Part 3 needs the "
                             "finished runs of budget_curve.py in --work_dir; a fresh clone has none, and with the "
                             "committed OUTPUT.json and its --seed, --reuse_results redoes part 2 from --points and "
                             "keeps the rest as recorded.")
    parser.add_argument("--note", default="")
    parser.add_argument("--overwrite_output", action="store_true", help=OVERWRITE_HELP)
    return parser.parse_args()


def test_composition(bench: Benchmark, splits) -> dict:
    """Per direction: test images, those with a near-duplicate in the training side (mirrors included, as the
    benchmark's dedup column), and those whose only near-duplicates are mirror images."""
    composition = {}
    for direction, split in splits.items():
        train, test = (bench.decoded.subset(split[part].tolist()) for part in ("train", "test"))
        direct = check_leakage(train, test, mirror=False)
        leaked = int(split["leaked"].sum())
        composition[direction] = {"test": len(test), "duplicated": leaked, "deduplicated": len(test) - leaked,
                                  "mirror_only": leaked - direct.num_near}
    return composition


def split_recorded_points(points, composition) -> dict:
    """Per method and direction, the seeds' mean accuracy on all, de-duplicated and duplicated test images (the
    last from the first two: all = duplicated and de-duplicated images together)."""
    table = {}
    for method in METHODS:
        mine = [p for p in points if p["method"] == method]
        if not mine:
            continue
        table[method] = {"seeds": sorted(p["seed"] for p in mine)}
        for direction, sizes in composition.items():
            n, dedup = sizes["test"], sizes["deduplicated"]
            all_acc = np.array([p[direction]["accuracy"] for p in mine])
            dedup_acc = np.array([p[direction]["accuracy_deduplicated"] for p in mine])
            dup_acc = (all_acc * n - dedup_acc * dedup) / (n - dedup)
            table[method][direction] = {"all": float(all_acc.mean()), "deduplicated": float(dedup_acc.mean()),
                                        "duplicated": float(dup_acc.mean()),
                                        "duplicated_per_seed": [float(a) for a in dup_acc]}
    return table


def run_folder(method: str, minutes: float, seed: int, work_dir: str, data_dir: str, points: str) -> str:
    """The run folder `pretrain_for_budget` made for `method` (its chosen recipe) at this budget and seed; a missing
    one names the command that trains it (`points`: the results file whose recorded steps it trains)."""
    path = budget_run_dir(work_dir, method_recipe(method).get("name", method), minutes, seed)
    try:
        with open(os.path.join(path, "pretraining_summary.json")) as f:
            finished = json.load(f).get("stop_reason") != "interrupted"  # an interrupted one saved part of its steps
    except (OSError, ValueError):
        finished = False
    if not finished:
        raise FileNotFoundError(
            f"{path} is not a finished run: train it (or finish it) first, with the steps its recorded points "
            f"trained, with `python benchmarks/budget_curve.py --reuse_results --reuse_from {points} --data_dir "
            f"{data_dir} --minutes {minutes:g} --seeds {seed} --methods {method} --work_dir {work_dir} --output "
            f"{os.path.join(work_dir, 'mirror_runs')}` (this script trains nothing).")
    return path


def mirrored_validation(features, mirrored, bench: Benchmark, split, chosen) -> dict:
    """The MSFA set chosen on validation, fitted on the fit part and scored on the validation images as they are and
    mirrored left-right (one head: only the images it is scored on change)."""
    train_idx, mask = split["train"], split["validation_mask"]
    fit_rows, validation_rows = train_idx[~mask], train_idx[mask]
    chosen = (tuple(chosen["layers"]), tuple(chosen["timesteps"]))
    inputs, mirrored_inputs = concatenate_features(features, *chosen), concatenate_features(mirrored, *chosen)
    config, labels = ProbeConfig(), bench.labels
    head = train_heads({chosen: inputs[fit_rows]}, labels[fit_rows], len(bench.label_names), config,
                       hidden_size=config.hidden_size)[chosen]
    return {"validation": accuracy(head, inputs[validation_rows], labels[validation_rows]),
            "validation_mirrored": accuracy(head, mirrored_inputs[validation_rows], labels[validation_rows])}


def probe_mirrors(method: str, run_dir: str, bench: Benchmark, splits) -> dict:
    """Part 3 for one run: MSFA validation accuracy on the validation images and on their mirror images, with the
    package's read-out and with test-time flip averaging (test accuracy for information)."""
    extractor = load_extractor(method, run_dir)
    name = os.path.basename(run_dir)
    rows = {}
    for readout in ("default", "flip_average"):
        args = readout_arguments(flip_average=readout == "flip_average")  # a baseline's `resolve` drops timesteps
        features = cached_extract(extractor, bench, args, feature_cache_name(name, args))[0]
        mirrored = cached_extract(extractor, bench, args, feature_cache_name(name, args), mirrored=True)[0]
        rows[readout] = {}
        for direction, split in splits.items():
            msfa = probe_protocol(features, bench, split, ProbeConfig())["msfa"]
            rows[readout][direction] = {
                **mirrored_validation(features, mirrored, bench, split, msfa),
                "test": msfa["test"]["all"]["accuracy"], "test_deduplicated": msfa["test"]["deduplicated"]["accuracy"]}
            logger.info("%s, %s, %s: %s", method, readout, direction, rows[readout][direction])
    return rows


# How MicDiffRep's flip average noised the mirror image when the rows were measured (`flip_noise` of the results).
FLIP_NOISE = {
    "shared": "the same for an image and its mirror by construction (MicDiffRep noises both with its one fixed noise)",
    "mirrored": "the same for an image and its mirror by construction, for MicDiffRep nearly: these rows were measured "
                "when its mirror view was the noised image mirrored, noise and all (flip averaging shares the noise "
                "since)",
    "mixed": "rows measured in two ways: see the note",
}


def markdown(result) -> str:
    env, composition = result["environment"], result["composition"]
    lines = ["# Mirrored near-duplicates and mirror invariance", "", f"Command: `{result['command']}`  ",
             machine_line(env), "", *rendered_lines(result)]
    if result["note"]:
        lines += [result["note"], ""]
    lines += ["## The cross-source test sets", "",
              "| direction | test images | with a near-duplicate in training | of them only as a mirror image | "
              "de-duplicated |", "|---|---|---|---|---|"]
    for direction, c in composition.items():
        lines.append(f"| {direction} | {c['test']} | {c['duplicated']} ({100 * c['duplicated'] / c['test']:.0f}%) | "
                     f"{c['mirror_only']} | {c['deduplicated']} |")
    split = result["recorded"]
    seeds = sorted({s for row in split.values() for s in row["seeds"]})
    lines += ["", f"## All test images = duplicated + de-duplicated (the recorded points of "
              f"`{result['points_file']}`, means of seeds {', '.join(map(str, seeds))})", "",
              "Accuracy on the test images with a near-duplicate in training is worked out from the recorded all and "
              "de-duplicated accuracies and the subsets' sizes above.", "",
              "| method | " + " | ".join(f"{d}: all | dedup | duplicated" for d in composition) + " |",
              "|---|" + "---|---|---|" * len(composition)]
    for method, row in split.items():
        lines.append(f"| {METHODS[method]} | " + " | ".join(
            f"{row[d]['all']:.3f} | {row[d]['deduplicated']:.3f} | {row[d]['duplicated']:.3f}" for d in composition)
            + " |")
    probed = result["probed"]
    if probed:
        lines += ["", f"## Mirror invariance on validation ({result['minutes']:g}-minute runs, seed {result['seed']})",
                  "", "MSFA (layers and timesteps chosen on the validation images as they are) fitted on the fit "
                  "part; *val* scores it on the validation images, *val mirrored* on the same images mirrored "
                  "left-right. *Flip average*: the features of an image and of its mirror averaged "
                  f"(`--flip_average`), {FLIP_NOISE[result.get('flip_noise', 'mirrored')]}. *Test* columns are for "
                  "information only; nothing here chooses a read-out.", "",
                  "| method | read-out | " + " | ".join(
                      f"{d}: val | val mirrored | *test (dedup)*" for d in composition) + " |",
                  "|---|---|" + "---|---|---|" * len(composition)]
        for method, rows in probed.items():
            for readout, by_direction in rows.items():
                cells = [f"{r['validation']:.3f} | {r['validation_mirrored']:.3f} | "
                         f"*{r['test']:.3f} ({r['test_deduplicated']:.3f})*"
                         for r in (by_direction[d] for d in composition)]
                lines.append(f"| {METHODS[method]} | {readout.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if not os.path.isfile(args.points):
        raise FileNotFoundError(f"--points {args.points} does not exist: give a budget_curve.py results file.")
    with open(args.points) as f:
        points = [p for p in json.load(f)["points"] if p["minutes"] == args.minutes]
    previous = {}
    if args.reuse_results and os.path.isfile(args.output + ".json"):
        with open(args.output + ".json") as f:
            previous = json.load(f)
        if (previous["minutes"], previous["seed"]) != (args.minutes, args.seed):
            previous = {}
    kept = int(bool(previous) and set(previous.get("probed", {})) <= set(args.methods))
    check_recorded_results(args.output, args.overwrite_output, kept, reusable=True)
    composition = previous.get("composition")
    probed = {method: previous["probed"][method] for method in args.methods if method in previous.get("probed", {})}
    run_dirs = {method: run_folder(method, args.minutes, args.seed, args.work_dir, args.data_dir, args.points)
                for method in args.methods if method not in probed}
    if composition is None or run_dirs:
        bench = Benchmark(args.data_dir, args.work_dir)
        splits = {direction: bench.split(direction) for direction, _ in DIRECTIONS}
        composition = composition or test_composition(bench, splits)
    flip_noise = previous.get("flip_noise", "mirrored") if probed else "shared"
    if probed and run_dirs and flip_noise != "shared":
        flip_noise = "mixed"
    # nothing measured here (every probe reused): the machine and versions the results were measured with
    measured = bool(run_dirs) or not previous.get("composition")
    environment = previous["environment"] if previous.get("environment") and not measured else environment_info()
    result = {**provenance(previous, measured), "environment": environment,
              "note": args.note or (previous.get("note", "") if not measured else ""),
              "flip_noise": flip_noise,
              "minutes": args.minutes, "seed": args.seed, "points_file": os.path.relpath(args.points, REPO),
              "composition": composition, "recorded": split_recorded_points(points, composition), "probed": probed}
    write_results(args.output, result, markdown(result))
    for method, run_dir in run_dirs.items():
        result["probed"][method] = probe_mirrors(method, run_dir, bench, splits)
        write_results(args.output, result, markdown(result))  # after every method
    print(markdown(result))


if __name__ == "__main__":
    run_main(main)
