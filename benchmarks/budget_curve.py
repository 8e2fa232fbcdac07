#!/usr/bin/env python
"""Accuracy against pretraining budget: MicDiffRep (the package's default recipe) and MoCo v2 (and BYOL with
`--methods`) at several budgets.

    python benchmarks/budget_curve.py --data_dir DATA_DIR --minutes 10 30 --seeds 0 1

Writes `benchmarks/results/budget_curve.{png,json,md}`: MSFA test accuracy in both cross-source directions against
pretraining minutes (solid: all test images; dashed: the de-duplicated ones). Each point is its own run with its
own learning-rate schedule laid over that budget's steps (`benchmarks/common.py`); runs shared with
`brain_tumor_mri.py` (same work folder) are reused. Layers and timesteps are chosen on validation, as everywhere.
With several `--seeds` (pretraining seeds: initial weights, data order, noise; the splits and probes stay the same),
the lines join the seeds' means, each seed is a dot, and the crossings are those of the means. The results also
check the benchmark's target at every budget: MicDiffRep at least 2 points above the best baseline measured, in both
directions, on all and on the de-duplicated test images (on the seeds' means).
"""

import argparse
import json
import logging
import os
import sys
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (DEFAULT_DATA_DIR, DIRECTIONS, MAX_IMAGES_HELP, OVERWRITE_HELP, REPO, Benchmark,  # noqa: E402
                    HelpFormatter, cached_extract, check_recorded_results, environment_info, load_extractor,
                    machine_line, method_recipe, output_prefix, positive_float, positive_int, pretrain_for_budget,
                    probe_protocol, provenance, readout_arguments, rendered_lines, restore_calibration,
                    run_feature_cache_name, run_main, unet_config, writable_folder, write_results)
from mic_diffrep.probing import ProbeConfig  # noqa: E402


logger = logging.getLogger("benchmark")

METHODS = {"micdiffrep": "MicDiffRep-MS", "mocov2": "MoCo v2", "byol": "BYOL"}
# The benchmark's target (issue #12): MicDiffRep-MS at least this many points above the best baseline.
TARGET_MARGIN = 2.0


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--work_dir", type=writable_folder, default=os.path.join(REPO, "runs", "benchmark"))
    parser.add_argument("--output", type=output_prefix,
                        default=os.path.join(REPO, "benchmarks", "results", "budget_curve"))
    parser.add_argument("--minutes", type=positive_float, nargs="+", default=[10.0, 30.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="Pretraining seeds of every point (seed 0: the runs `brain_tumor_mri.py` shares).")
    parser.add_argument("--methods", nargs="+", default=["micdiffrep", "mocov2"], choices=list(METHODS),
                        help="Methods to pretrain at every budget (MicDiffRep is always one of them).")
    parser.add_argument("--resolution", type=positive_int, default=64)
    parser.add_argument("--unet", type=unet_config, default=None,
                        help="UNet preset or config instead of the package default ('mini' for smoke runs: at 64 px "
                             "'tiny' is slower, its attention at 32x32).")
    parser.add_argument("--flip_average", action="store_true", help="Test-time flip averaging for both methods.")
    parser.add_argument("--pooling", default=None, choices=["avg", "avgmax"],
                        help="Feature pooling for both methods (default: the package's).")
    parser.add_argument("--max_images", type=positive_int, default=None, help=MAX_IMAGES_HELP)
    parser.add_argument("--reuse_results", action="store_true",
                        help="Take the points already in OUTPUT.json (same method, minutes and seed; same run and "
                             "read-out where the point records them) instead of pretraining and probing again, and "
                             "on a machine without their calibrations restore them from the recorded seed-0 points, "
                             "so that a new seed trains the steps the recorded ones did (e.g. add a seed).")
    parser.add_argument("--reuse_from", nargs="+", default=[], metavar="JSON",
                        help="With --reuse_results: also take the points recorded in these results files of this "
                             "script (after those of OUTPUT.json), e.g. the 30-minute seeds of "
                             "benchmarks/results/seeds_30min.json for a curve with more seeds.")
    parser.add_argument("--recorded_only", action="store_true",
                        help="With --reuse_results: take the recorded points only, train and probe nothing (rewrites "
                             "the results, e.g. with a new --note, after a run was stopped part-way; the recorded "
                             "environment is kept).")
    parser.add_argument("--note", default="")
    parser.add_argument("--overwrite_output", action="store_true", help=OVERWRITE_HELP)
    args = parser.parse_args()
    if len(set(args.seeds)) < len(args.seeds):  # three 0s counted as three seeds, with a standard error of 0
        parser.error(f"--seeds {' '.join(map(str, args.seeds))}: each seed once.")
    if args.recorded_only and not args.reuse_results:
        parser.error("--recorded_only takes the points of OUTPUT.json: give --reuse_results too.")
    if args.reuse_from and not args.reuse_results:
        parser.error("--reuse_from adds recorded points to those of OUTPUT.json: give --reuse_results too.")
    for path in args.reuse_from:
        if not os.path.isfile(path):
            parser.error(f"--reuse_from: no results file at {path}.")
    return args


KEYS = ("accuracy", "accuracy_deduplicated")


def mean_points(points):
    """One point per (method, minutes): each direction's accuracies averaged over the seeds measured, with their
    spread (`"range"`: max - min), their sample standard deviation (`"std"`, None for one seed) and the seeds."""
    means = []
    for method, minutes in dict.fromkeys((p["method"], p["minutes"]) for p in points):
        group = [p for p in points if (p["method"], p["minutes"]) == (method, minutes)]
        mean = {"method": method, "minutes": minutes, "seeds": [p.get("seed", 0) for p in group],
                "steps": [p["steps"] for p in group]}
        for direction, _ in DIRECTIONS:
            mean[direction] = {key: float(np.mean([p[direction][key] for p in group])) for key in KEYS}
            mean[direction]["range"] = {key: float(np.ptp([p[direction][key] for p in group])) for key in KEYS}
            mean[direction]["std"] = {key: float(np.std([p[direction][key] for p in group], ddof=1))
                                      if len(group) > 1 else None for key in KEYS}
            validation = [p[direction]["validation_accuracy"] for p in group if "validation_accuracy" in p[direction]]
            if len(validation) == len(group):
                mean[direction]["validation_accuracy"] = float(np.mean(validation))
        means.append(mean)
    return means


def plot(points, path):
    """Accuracy against minutes, one panel per direction; with a single budget, one column of points per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = mean_points(points)
    methods = [m for m in METHODS if any(p["method"] == m for p in points)]
    single = len({p["minutes"] for p in points}) == 1
    x = (lambda p: methods.index(p["method"])) if single else (lambda p: p["minutes"])
    fig, axes = plt.subplots(1, len(DIRECTIONS), figsize=(5 * len(DIRECTIONS), 4), sharey=True)
    for ax, (direction, _) in zip(axes, DIRECTIONS):
        for method in methods:
            rows = sorted((p for p in means if p["method"] == method), key=lambda p: p["minutes"])
            seeds = [p for p in points if p["method"] == method]
            line, = ax.plot([x(p) for p in rows], [p[direction]["accuracy"] for p in rows], "o-",
                            label=f"{METHODS[method]}, all")
            ax.plot([x(p) for p in rows], [p[direction]["accuracy_deduplicated"] for p in rows], "v--",
                    color=line.get_color(), label=f"{METHODS[method]}, de-duplicated")
            if any(len(p["seeds"]) > 1 for p in rows):
                for key in KEYS:
                    ax.plot([x(p) for p in seeds], [p[direction][key] for p in seeds], ".",
                            color=line.get_color(), alpha=0.5)
        ax.set_title(f"cross-source {direction}")
        if single:
            ax.set_xticks(range(len(methods)), [METHODS[m] for m in methods])
            ax.set_xlim(-0.5, len(methods) - 0.5)
            ax.set_xlabel(f"pretraining budget: {points[0]['minutes']:g} minutes of this 2-core CPU")
        else:
            ax.set_xlabel("pretraining budget (minutes of this 2-core CPU)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MSFA test accuracy" + (" (mean of seeds; dots: each seed)"
                                               if any(len(p["seeds"]) > 1 for p in means) else ""))
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def crossing(points, direction, key, baseline="mocov2"):
    """Where MicDiffRep's line crosses `baseline`'s (linear interpolation between measured budgets), if it does;
    `points` hold one point per method and budget (the seeds' means)."""
    mine = {p["minutes"]: p[direction][key] for p in points if p["method"] == "micdiffrep"}
    theirs = {p["minutes"]: p[direction][key] for p in points if p["method"] == baseline}
    budgets = sorted(set(mine) & set(theirs))
    gaps = [mine[m] - theirs[m] for m in budgets]
    for (m0, g0), (m1, g1) in zip(zip(budgets, gaps), zip(budgets[1:], gaps[1:])):
        if g0 == 0 or g0 * g1 < 0:
            return m0 + (m1 - m0) * (g0 / (g0 - g1)) if g0 != g1 else m0
    if all(g > 0 for g in gaps):
        return "MicDiffRep ahead at every budget measured"
    if all(g < 0 for g in gaps):
        return f"{METHODS[baseline]} ahead at every budget measured"
    return "no crossing between the budgets measured"


def target_gaps(points):
    """Per budget, direction and key: MicDiffRep's accuracy minus the best baseline's, in points, whether it meets
    `TARGET_MARGIN`, and the difference's standard error in points (`sqrt(s1^2/n1 + s2^2/n2)` from the seeds' sample
    standard deviations; None unless both have two seeds or more); `points` hold one point per method and budget (the
    seeds' means, `mean_points`).

    >>> scores = lambda a: {"accuracy": a, "accuracy_deduplicated": a}
    >>> points = [{"method": m, "minutes": 30, "sartaj->other": scores(a), "other->sartaj": scores(a)}
    ...           for m, a in [("micdiffrep", 0.88), ("mocov2", 0.85), ("byol", 0.87)]]
    >>> gap = target_gaps(points)[30]["sartaj->other"]["accuracy"]
    >>> round(gap["points"], 1), gap["baseline"], gap["met"]
    (1.0, 'byol', False)
    """
    gaps = {}
    for minutes in sorted({p["minutes"] for p in points}):
        here = {p["method"]: p for p in points if p["minutes"] == minutes}
        baselines = [m for m in here if m != "micdiffrep"]
        if "micdiffrep" not in here or not baselines:
            continue
        gaps[minutes] = {}
        for direction, _ in DIRECTIONS:
            gaps[minutes][direction] = {}
            for key in KEYS:
                best = max(baselines, key=lambda m: here[m][direction][key])
                points_ahead = 100 * (here["micdiffrep"][direction][key] - here[best][direction][key])
                gaps[minutes][direction][key] = {"points": points_ahead, "baseline": best,
                                                 "met": round(points_ahead, 6) >= TARGET_MARGIN,
                                                 "standard_error": difference_standard_error(
                                                     here["micdiffrep"], here[best], direction, key)}
    return gaps


def format_gap(gap) -> str:
    """Points ahead with one decimal, or two where one would round a missed target up to its margin.

    >>> format_gap({"points": 1.968, "met": False}), format_gap({"points": 2.023, "met": True})
    ('+1.97', '+2.0')
    """
    digits = 2 if not gap["met"] and round(gap["points"], 1) >= TARGET_MARGIN else 1
    return f"{gap['points']:+.{digits}f}"


def main():
    args = parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)  # before the work, not after it
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    bench = splits = None
    feature_args = readout_arguments(args.flip_average, args.pooling)

    readout = {"pooling": feature_args.pooling, "flip_average": feature_args.flip_average}
    recorded = {}  # results file -> its points
    if args.reuse_results:
        for path in [args.output + ".json", *args.reuse_from]:
            if os.path.isfile(path):
                with open(path) as f:
                    recorded[path] = json.load(f)["points"]
    previous = [point for points in recorded.values() for point in points]
    grid = [(minutes, seed, method) for minutes in args.minutes for seed in args.seeds
            for method in dict.fromkeys(["micdiffrep", *args.methods])]
    recipes = {method: method_recipe(method, args.unet) for method in dict.fromkeys(["micdiffrep", *args.methods])}
    reusable = {(minutes, seed, method): reusable_point(previous, method, minutes, seed,
                                                        recipes[method].get("name", method), readout, args.max_images)
                for minutes, seed, method in grid}
    if not args.recorded_only:  # (which refuses to drop a point itself, naming it)
        kept = sum(1 for point in recorded.get(args.output + ".json", [])
                   if any(point is reused for reused in reusable.values()))
        check_recorded_results(args.output, args.overwrite_output, kept, reusable=True)

    points, measured = [], False
    for minutes, seed, method in grid:
        recipe = recipes[method]
        run_name = recipe.get("name", method)
        reused = reusable[(minutes, seed, method)]
        if reused:
            logger.info("%s, %g min, seed %d: recorded point reused", method, minutes, seed)
            points.append(reused)
            continue
        if args.recorded_only:
            logger.info("%s, %g min, seed %d: not recorded, left out (--recorded_only)", method, minutes, seed)
            continue
        if bench is None:  # the data, only once a point is measured
            bench = Benchmark(args.data_dir, args.work_dir, args.resolution, max_images=args.max_images)
            splits = {direction: bench.split(direction) for direction, _ in DIRECTIONS}
        first_seed = reusable_point(previous, method, minutes, 0, run_name, readout, args.max_images)
        if first_seed:  # a seed trains seed 0's steps: restore its calibration on a machine without it
            restore_calibration(method, run_name, args.work_dir, args.data_dir, args.resolution,
                                recipe.get("recipe_argv", []), first_seed["steps"], minutes, None,
                                next(path for path, kept in recorded.items() if first_seed in kept))
        run = pretrain_for_budget(method, minutes, args.work_dir, args.data_dir, args.resolution, seed,
                                  **recipe)
        features = cached_extract(load_extractor(method, run["output_dir"]), bench, feature_args,
                                  run_feature_cache_name(run, feature_args))[0]
        point = {"method": method, "minutes": minutes, "seed": seed, "steps": run["summary"]["global_step"],
                 "run": run_name, "readout": readout,
                 **({"max_images": args.max_images} if args.max_images else {})}
        for direction, split in splits.items():
            msfa = probe_protocol(features, bench, split, ProbeConfig())["msfa"]
            point[direction] = {"accuracy": msfa["test"]["all"]["accuracy"],
                                "accuracy_deduplicated": msfa["test"]["deduplicated"]["accuracy"],
                                "validation_accuracy": msfa["validation_accuracy"]}
        points.append(point)
        measured = True
        save(args, points, measured)  # after every point: an interrupted curve keeps what it measured
    if args.recorded_only:  # re-rendering must not shrink the only record of hours of runs
        dropped = [p for p in recorded.get(args.output + ".json", []) if p not in points]
        if dropped:
            raise SystemExit(f"budget_curve.py: error: --recorded_only would drop {len(dropped)} recorded point(s) of "
                             f"{args.output}.json outside --minutes / --seeds / --methods or of another read-out "
                             f"(e.g. {dropped[0]['method']}, {dropped[0]['minutes']:g} min, seed "
                             f"{dropped[0]['seed']}): give them, or another --output; nothing was written.")
    print(save(args, points, measured))


def reusable_point(previous, method: str, minutes: float, seed: int, run: str, readout: dict,
                   max_images: Optional[int] = None):
    """The recorded point of `method` at `minutes` with `seed`, if its run, read-out and `--max_images` are `run`,
    `readout` and `max_images` (a smoke run's point is not the real one; a point recorded before points named
    them is taken as it is: its results file's command says how it was made)."""
    for point in previous:
        if (point["method"], point["minutes"], point["seed"]) == (method, minutes, seed) \
                and point.get("run", run) == run and point.get("readout", readout) == readout \
                and point.get("max_images") == max_images:
            return point
    return None


def save(args, points, measured: bool = True) -> str:
    """Writes the plot and the results files of `points`; returns the markdown. A re-render (nothing `measured`:
    every point reused) keeps the environment OUTPUT.json recorded, the one its points were measured in, and its
    note unless given one."""
    plot(points, args.output + ".png")
    environment, note, recorded = environment_info(), args.note, {}
    if not measured and os.path.isfile(args.output + ".json"):
        with open(args.output + ".json") as f:
            recorded = json.load(f)
        environment = recorded.get("environment", environment)
        note = note or recorded.get("note", "")  # a re-render keeps the recorded note unless given one
    result = {**provenance(recorded, measured), "environment": environment, "note": note,
              "image": os.path.basename(args.output) + ".png", **summarise(points)}
    text = markdown(result)
    write_results(args.output, result, text)
    return text


def summarise(points):
    """`{"points", "means", "crossings", "targets"}` of the points measured: the seeds' means, where MicDiffRep's
    line crosses each baseline's, and the target check at every budget."""
    means = mean_points(points)
    baselines = [m for m in METHODS if m != "micdiffrep" and any(p["method"] == m for p in points)]
    crossings = {baseline: {direction: {key: crossing(means, direction, key, baseline) for key in KEYS}
                            for direction, _ in DIRECTIONS} for baseline in baselines}
    return {"points": points, "means": means, "crossings": crossings, "targets": target_gaps(means)}


def difference_standard_error(mine, theirs, direction, key):
    """The standard error, in points, of the difference between two means of seeds (None without two seeds each).

    >>> point = lambda seeds, std: {"seeds": seeds, "d": {"std": {"accuracy": std}}}
    >>> round(difference_standard_error(point([0, 1, 2], 0.03), point([0, 1, 2], 0.04), "d", "accuracy"), 2)
    2.89
    """
    stds = [p[direction].get("std", {}).get(key) for p in (mine, theirs)]
    if any(std is None for std in stds):
        return None
    return float(100 * np.sqrt(sum(std ** 2 / len(p["seeds"]) for std, p in zip(stds, (mine, theirs)))))


def transfer_table(means, several_seeds: bool):
    """How much of each method's in-source accuracy carries over to the other source: the MSFA validation accuracy
    (the part carved from the training side, which chooses layers and timesteps) against the test accuracy on all
    cross-source test images."""
    if not all("validation_accuracy" in p[d] for p in means for d, _ in DIRECTIONS):
        return []
    lines = ["", "In-source validation against the cross-source test" + (" (the seeds' means)" if several_seeds else "")
             + ": *drop* = validation - test accuracy, in points.", "",
             "| method | minutes | " + " | ".join(f"{d} validation | test | drop" for d, _ in DIRECTIONS) + " |",
             "|---|---|" + "---|---|---|" * len(DIRECTIONS)]
    for p in sorted(means, key=lambda p: (list(METHODS).index(p["method"]), p["minutes"])):
        cells = [f"{p[d]['validation_accuracy']:.3f} | {p[d]['accuracy']:.3f} | "
                 f"{100 * (p[d]['validation_accuracy'] - p[d]['accuracy']):.1f}" for d, _ in DIRECTIONS]
        lines.append(f"| {METHODS[p['method']]} | {p['minutes']:g} | " + " | ".join(cells) + " |")
    return lines


def markdown(result):
    """The results file's text from `result` (as written to the JSON file: `summarise`'s keys, command, machine,
    note and image)."""
    points, means, env = result["points"], result["means"], result["environment"]
    seeds = sorted({p["seed"] for p in points})
    lines = ["# Accuracy against pretraining budget", "", f"Command: `{result['command']}`  ",
             machine_line(env), "", *rendered_lines(result),
             f"![budget curve]({result.get('image', 'budget_curve.png')})", ""]
    if result["note"]:
        lines += [result["note"], ""]
    lines += ["| method | minutes | seed | steps | " + " | ".join(f"{d} (dedup)" for d, _ in DIRECTIONS) + " |",
              "|---|---|---|---|" + "---|" * len(DIRECTIONS)]
    for p in sorted(points, key=lambda p: (list(METHODS).index(p["method"]), p["minutes"], p["seed"])):
        cells = [f"{p[d]['accuracy']:.3f} ({p[d]['accuracy_deduplicated']:.3f})" for d, _ in DIRECTIONS]
        lines.append(f"| {METHODS[p['method']]} | {p['minutes']:g} | {p['seed']} | {p['steps']} | "
                     + " | ".join(cells) + " |")
    if len(seeds) > 1:
        lines += ["", f"Means over seeds {', '.join(map(str, seeds))} (those measured of each), ± half their spread "
                  "(max - min) in points:", "",
                  "| method | minutes | seeds | " + " | ".join(f"{d} (dedup)" for d, _ in DIRECTIONS) + " |",
                  "|---|---|---|" + "---|" * len(DIRECTIONS)]
        for p in sorted(means, key=lambda p: (list(METHODS).index(p["method"]), p["minutes"])):
            cells = [f"{p[d]['accuracy']:.3f} ±{50 * p[d]['range']['accuracy']:.1f} "
                     f"({p[d]['accuracy_deduplicated']:.3f} ±{50 * p[d]['range']['accuracy_deduplicated']:.1f})"
                     for d, _ in DIRECTIONS]
            lines.append(f"| {METHODS[p['method']]} | {p['minutes']:g} | {', '.join(map(str, p['seeds']))} | "
                         + " | ".join(cells) + " |")
    lines += transfer_table(means, len(seeds) > 1)
    mean_text = "; the seeds' means" if len(seeds) > 1 else ""
    for baseline, by_direction in result["crossings"].items():
        lines += ["", f"Where MicDiffRep's line crosses {METHODS[baseline]}'s (minutes, by linear interpolation "
                  f"between the budgets measured{mean_text}):", ""]
        for direction, values in by_direction.items():
            for key, value in values.items():
                text = f"{value:.1f} min" if isinstance(value, float) else value
                lines.append(f"- {direction}, {'all test images' if key == 'accuracy' else 'de-duplicated'}: {text}")
    lines += ["", f"Target: MicDiffRep-MS at least {TARGET_MARGIN:g} points above the best baseline measured ("
              f"{', '.join(METHODS[b] for b in result['crossings'])}); points ahead of the best one"
              + (", on the seeds' means" if len(seeds) > 1 else "") + ":", "",
              "| minutes | " + " | ".join(f"{d}, {k}" for d, _ in DIRECTIONS for k in ("all", "dedup")) + " |",
              "|---|" + "---|" * 2 * len(DIRECTIONS)]
    for minutes, by_direction in result["targets"].items():
        cells = [format_gap(g) + (f" ±{g['standard_error']:.1f}" if g.get("standard_error") is not None
                                          else "") + f" ({METHODS[g['baseline']]}) {'met' if g['met'] else '**missed**'}"
                 for direction, _ in DIRECTIONS for g in (by_direction[direction][k] for k in KEYS)]
        lines.append(f"| {float(minutes):g} | " + " | ".join(cells) + " |")
    gaps = [g for by_direction in result["targets"].values() for by_key in by_direction.values()
            for g in by_key.values()]
    if any(g.get("standard_error") is not None for g in gaps):
        lines += ["", "± the standard error of the difference of the two means, from the seeds' sample standard "
                  "deviations: a gap within about twice it could go either way with other seeds."]
    if not all(g["met"] for g in gaps):
        lines += ["", "What was tried to meet the target (recipes and read-outs, chosen on validation): "
                  "[ablations.md](ablations.md) and the README's ablation section."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main)
