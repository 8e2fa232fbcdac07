#!/usr/bin/env python
"""Accuracy against pretraining budget: MicDiffRep (the package's default recipe) and MoCo v2 at several budgets.

    python benchmarks/budget_curve.py --data_dir DATA_DIR --minutes 10 30 --seeds 0 1

Writes `benchmarks/results/budget_curve.{png,json,md}`: MSFA test accuracy in both cross-source directions against
pretraining minutes (solid: all test images; dashed: the de-duplicated ones). Each point is its own run with its
own learning-rate schedule laid over that budget's steps (`benchmarks/common.py`); runs shared with
`brain_tumor_mri.py` (same work folder) are reused. Layers and timesteps are chosen on validation, as everywhere.
With several `--seeds` (pretraining seeds: initial weights, data order, noise; the splits and probes stay the same),
the lines join the seeds' means, each seed is a dot, and the crossings are those of the means.
"""

import argparse
from dataclasses import replace
import json
import logging
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (DEFAULT_DATA_DIR, DIRECTIONS, REPO, Benchmark, baseline_recipe, cached_extract,  # noqa: E402
                    command_line, environment_info, micdiffrep_run, pretrain_for_budget, probe_protocol,
                    readout_arguments, run_feature_cache_name)
from mic_diffrep.features import DiffusionFeatureExtractor, EncoderFeatureExtractor  # noqa: E402
from mic_diffrep.probing import ProbeConfig  # noqa: E402


METHODS = {"micdiffrep": "MicDiffRep-MS", "mocov2": "MoCo v2"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--work_dir", default=os.path.join(REPO, "runs", "benchmark"))
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "budget_curve"))
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0, 30.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="Pretraining seeds of every point (seed 0: the runs `brain_tumor_mri.py` shares).")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--unet", default=None, help="UNet preset or config instead of the package default ('tiny' "
                                                     "for smoke runs).")
    parser.add_argument("--flip_average", action="store_true", help="Test-time flip averaging for both methods.")
    parser.add_argument("--pooling", default=None, choices=["avg", "avgmax"],
                        help="Feature pooling for both methods (default: the package's).")
    parser.add_argument("--max_images", type=int, default=None, help="Use a subset (smoke runs only).")
    parser.add_argument("--note", default="")
    return parser.parse_args()


KEYS = ("accuracy", "accuracy_deduplicated")


def mean_points(points):
    """One point per (method, minutes): each direction's accuracies averaged over the seeds measured, with their
    spread (`"range"`: max - min) and the seeds."""
    means = []
    for method, minutes in dict.fromkeys((p["method"], p["minutes"]) for p in points):
        group = [p for p in points if (p["method"], p["minutes"]) == (method, minutes)]
        mean = {"method": method, "minutes": minutes, "seeds": [p.get("seed", 0) for p in group],
                "steps": [p["steps"] for p in group]}
        for direction, _ in DIRECTIONS:
            mean[direction] = {key: float(np.mean([p[direction][key] for p in group])) for key in KEYS}
            mean[direction]["range"] = {key: float(np.ptp([p[direction][key] for p in group])) for key in KEYS}
        means.append(mean)
    return means


def plot(points, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = mean_points(points)
    fig, axes = plt.subplots(1, len(DIRECTIONS), figsize=(5 * len(DIRECTIONS), 4), sharey=True)
    for ax, (direction, _) in zip(axes, DIRECTIONS):
        for method, title in METHODS.items():
            rows = sorted((p for p in means if p["method"] == method), key=lambda p: p["minutes"])
            seeds = [p for p in points if p["method"] == method]
            minutes = [p["minutes"] for p in rows]
            line, = ax.plot(minutes, [p[direction]["accuracy"] for p in rows], "o-", label=f"{title}, all")
            ax.plot(minutes, [p[direction]["accuracy_deduplicated"] for p in rows], "o--", color=line.get_color(),
                    label=f"{title}, de-duplicated")
            if any(len(p["seeds"]) > 1 for p in rows):
                for key in KEYS:
                    ax.plot([p["minutes"] for p in seeds], [p[direction][key] for p in seeds], ".",
                            color=line.get_color(), alpha=0.5)
        ax.set_title(f"cross-source {direction}")
        ax.set_xlabel("pretraining budget (minutes of this 2-core CPU)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MSFA test accuracy" + (" (mean of seeds; dots: each seed)"
                                               if any(len(p["seeds"]) > 1 for p in means) else ""))
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def crossing(points, direction, key):
    """Where MicDiffRep's line crosses MoCo v2's (linear interpolation between measured budgets), if it does;
    `points` hold one point per method and budget (the seeds' means)."""
    mine = {p["minutes"]: p[direction][key] for p in points if p["method"] == "micdiffrep"}
    theirs = {p["minutes"]: p[direction][key] for p in points if p["method"] == "mocov2"}
    budgets = sorted(set(mine) & set(theirs))
    gaps = [mine[m] - theirs[m] for m in budgets]
    for (m0, g0), (m1, g1) in zip(zip(budgets, gaps), zip(budgets[1:], gaps[1:])):
        if g0 == 0 or g0 * g1 < 0:
            return m0 + (m1 - m0) * (g0 / (g0 - g1)) if g0 != g1 else m0
    if all(g > 0 for g in gaps):
        return "MicDiffRep ahead at every budget measured"
    if all(g < 0 for g in gaps):
        return "MoCo v2 ahead at every budget measured"
    return "no crossing between the budgets measured"


def main():
    args = parse_args()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    bench = Benchmark(args.data_dir, args.work_dir, args.resolution, max_images=args.max_images)
    splits = {direction: bench.split(direction) for direction, _ in DIRECTIONS}
    feature_args = readout_arguments(args.flip_average, args.pooling)

    points = []
    for minutes in args.minutes:
        for seed in args.seeds:
            for method in METHODS:
                if method == "micdiffrep":
                    run = micdiffrep_run(minutes, args.work_dir, args.data_dir, args.resolution, seed, args.unet)
                    extractor = DiffusionFeatureExtractor.from_pretrained(run["output_dir"]).to(dtype=torch.bfloat16)
                    features = cached_extract(extractor, bench, feature_args,
                                              run_feature_cache_name(run, feature_args))[0]
                else:
                    run = pretrain_for_budget(method, minutes, args.work_dir, args.data_dir, args.resolution, seed,
                                              **baseline_recipe(method))
                    features = cached_extract(EncoderFeatureExtractor.from_pretrained(run["output_dir"]), bench,
                                              replace(feature_args, timesteps=[0]),
                                              run_feature_cache_name(run, feature_args))[0]
                point = {"method": method, "minutes": minutes, "seed": seed, "steps": run["summary"]["global_step"]}
                for direction, split in splits.items():
                    msfa = probe_protocol(features, bench, split, ProbeConfig())["msfa"]
                    point[direction] = {"accuracy": msfa["test"]["all"]["accuracy"],
                                        "accuracy_deduplicated": msfa["test"]["deduplicated"]["accuracy"],
                                        "validation_accuracy": msfa["validation_accuracy"]}
                points.append(point)
    plot(points, args.output + ".png")
    means = mean_points(points)
    crossings = {direction: {key: crossing(means, direction, key) for key in KEYS} for direction, _ in DIRECTIONS}
    result = {"command": command_line(), "environment": environment_info(), "note": args.note, "points": points,
              "means": means, "crossings": crossings}
    with open(args.output + ".json", "w") as f:
        json.dump(result, f, indent=2)
    env = result["environment"]
    lines = ["# Accuracy against pretraining budget", "", f"Command: `{result['command']}`  ",
             f"Machine: {env['processor']}, {env['cpu_count']} CPUs, no GPU; torch {env['torch']}", "",
             "![budget curve](budget_curve.png)", ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["| method | minutes | seed | steps | " + " | ".join(f"{d} (dedup)" for d, _ in DIRECTIONS) + " |",
              "|---|---|---|---|" + "---|" * len(DIRECTIONS)]
    for p in sorted(points, key=lambda p: (p["method"], p["minutes"], p["seed"])):
        cells = [f"{p[d]['accuracy']:.3f} ({p[d]['accuracy_deduplicated']:.3f})" for d, _ in DIRECTIONS]
        lines.append(f"| {METHODS[p['method']]} | {p['minutes']:g} | {p['seed']} | {p['steps']} | "
                     + " | ".join(cells) + " |")
    if len(args.seeds) > 1:
        lines += ["", f"Means over seeds {', '.join(map(str, args.seeds))}, ± half their spread (max - min) in "
                  "points:", "",
                  "| method | minutes | " + " | ".join(f"{d} (dedup)" for d, _ in DIRECTIONS) + " |",
                  "|---|---|" + "---|" * len(DIRECTIONS)]
        for p in sorted(means, key=lambda p: (p["method"], p["minutes"])):
            cells = [f"{p[d]['accuracy']:.3f} ±{50 * p[d]['range']['accuracy']:.1f} "
                     f"({p[d]['accuracy_deduplicated']:.3f} ±{50 * p[d]['range']['accuracy_deduplicated']:.1f})"
                     for d, _ in DIRECTIONS]
            lines.append(f"| {METHODS[p['method']]} | {p['minutes']:g} | " + " | ".join(cells) + " |")
    lines += ["", "Where the lines cross (minutes, by linear interpolation between the budgets measured"
              + ("; the seeds' means" if len(args.seeds) > 1 else "") + "):", ""]
    for direction, values in crossings.items():
        for key, value in values.items():
            text = f"{value:.1f} min" if isinstance(value, float) else value
            lines.append(f"- {direction}, {'all test images' if key == 'accuracy' else 'de-duplicated'}: {text}")
    with open(args.output + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
