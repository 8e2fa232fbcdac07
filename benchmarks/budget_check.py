#!/usr/bin/env python
"""Were the benchmark's equal budgets equal? Each method's training speed measured back to back, in one session,
against the steps its recorded 30-minute runs trained.

    python benchmarks/budget_check.py --data_dir DATA_DIR

The benchmark gives each method the steps its throughput calibration allows in the budget (`benchmarks/common.py`:
`calibrate`), and the calibrations of MicDiffRep, MoCo v2 and BYOL were measured in different sessions, on
machines whose speed drifted. This script measures the three methods' training speeds again, interleaved over
`--rounds` rounds (A B C A B C ...; the same short calibration runs, `measure_throughput`), so that drift hits each
alike, and works out how long each method's recorded steps (`--points`: the seeds file's, shared by every seed)
take at this session's speeds. Writes `benchmarks/results/budget_check.{json,md}`. It trains only the calibration
runs (60 steps each) and chooses nothing.
"""

import argparse
import json
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from budget_curve import METHODS  # noqa: E402
from common import (DEFAULT_DATA_DIR, OVERWRITE_HELP, REPO, HelpFormatter, calibration_argv,  # noqa: E402
                    check_recorded_results, command_line, environment_info, machine_line, measure_throughput,
                    method_recipe, output_prefix, positive_int, run_main, writable_folder, write_results)


logger = logging.getLogger("benchmark")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--work_dir", type=writable_folder, default=os.path.join(REPO, "runs", "benchmark"))
    parser.add_argument("--points", default=os.path.join(REPO, "benchmarks", "results", "seeds_30min.json"),
                        help="Results file of budget_curve.py whose recorded steps are checked.")
    parser.add_argument("--minutes", type=float, default=30.0, help="The budget of the recorded points checked.")
    parser.add_argument("--rounds", type=positive_int, default=3, help="Measurements of each method, interleaved.")
    parser.add_argument("--resolution", type=positive_int, default=64)
    parser.add_argument("--output", type=output_prefix,
                        default=os.path.join(REPO, "benchmarks", "results", "budget_check"))
    parser.add_argument("--note", default="")
    parser.add_argument("--overwrite_output", action="store_true", help=OVERWRITE_HELP)
    return parser.parse_args()


def recorded_steps(points_file: str, minutes: float) -> dict:
    """Each method's steps in the recorded points of `minutes` (the same for every seed: seed 0's calibration)."""
    with open(points_file, encoding="utf-8") as f:
        points = json.load(f)["points"]
    steps = {}
    for point in points:
        if point["minutes"] == minutes and point["method"] in METHODS:
            steps.setdefault(point["method"], set()).add(point["steps"])
    varying = {method: sorted(values) for method, values in steps.items() if len(values) > 1}
    if varying:
        raise SystemExit(f"{points_file}: the seeds of {sorted(varying)} trained different steps ({varying}).")
    return {method: values.pop() for method, values in steps.items()}


def measure(args) -> list:
    """`--rounds` rounds of one throughput measurement per method, interleaved."""
    measurements = []
    for round_index in range(args.rounds):
        for method in METHODS:
            recipe = method_recipe(method)
            name = f"{recipe.get('name', method)}-check"
            argv = calibration_argv(method, args.data_dir, args.work_dir, args.resolution,
                                    recipe.get("recipe_argv", ()))
            result = measure_throughput(method, name, args.work_dir, argv)
            result.update(method=method, round=round_index, measured_at=time.strftime("%Y-%m-%d %H:%M:%S"))
            logger.info("round %d, %s: %.3f steps/s", round_index, method, result["steps_per_second"])
            measurements.append(result)
    return measurements


def summarise(measurements: list, steps: dict) -> dict:
    """Per method: its median speed, and the minutes its recorded steps take at it, against MicDiffRep's."""
    rows = {}
    for method in METHODS:
        speeds = [m["steps_per_second"] for m in measurements if m["method"] == method]
        images_per_step = next(m["images_per_step"] for m in measurements if m["method"] == method)
        median = statistics.median(speeds)
        rows[method] = {"steps_per_second": speeds, "median_steps_per_second": median,
                        "images_per_second": median * images_per_step, "recorded_steps": steps[method],
                        "minutes_here": steps[method] / median / 60}
    reference = rows["micdiffrep"]["minutes_here"]
    for row in rows.values():
        row["share_of_micdiffrep_time"] = row["minutes_here"] / reference
        row["steps_for_equal_time"] = round(row["median_steps_per_second"] * 60 * reference)
    return rows


def render(result: dict) -> str:
    rows = result["rows"]
    lines = ["# Budget check: were the equal budgets equal?", "",
             f"Command: `{result['command']}`  ", machine_line(result["environment"]), "",
             f"Each method's training speed, measured {result['rounds']} times, interleaved in one session (the "
             f"benchmark's own calibration runs: steps 10 to 60 of a short run, bf16, {result['resolution']} px), "
             f"and how long the steps of its recorded {result['minutes']:g}-minute runs (`{result['points']}`, "
             f"shared by every seed) take at that speed. The benchmark fixed each method's steps from a calibration "
             f"of its own session; the machine's speed drifted between sessions.", "",
             "| method | steps/s (each round) | median steps/s | images/s | recorded steps | minutes here | "
             "share of MicDiffRep's time | steps for MicDiffRep's time |",
             "|---|---|---|---|---|---|---|---|"]
    for method, row in rows.items():
        lines.append(f"| {METHODS[method]} | {', '.join(f'{s:.2f}' for s in row['steps_per_second'])} | "
                     f"{row['median_steps_per_second']:.2f} | {row['images_per_second']:.0f} | "
                     f"{row['recorded_steps']} | {row['minutes_here']:.1f} | "
                     f"{row['share_of_micdiffrep_time']:.2f} | {row['steps_for_equal_time']} |")
    lines += ["", "A share below 1 means the method trained for less time than MicDiffRep at this session's speeds "
              "(its steps were too few for an equal budget); above 1, for more.", ""]
    if result["note"]:
        lines += [f"- {result['note']}", ""]
    return "\n".join(lines)


def main():
    args = parse_args()
    check_recorded_results(args.output, args.overwrite_output)
    steps = recorded_steps(args.points, args.minutes)
    missing = sorted(set(METHODS) - set(steps))
    if missing:
        raise SystemExit(f"{args.points} has no {args.minutes:g}-minute points of {missing}.")
    measurements = measure(args)
    result = {"command": command_line(), "environment": environment_info(), "note": args.note,
              "points": os.path.relpath(args.points, REPO), "minutes": args.minutes, "rounds": args.rounds,
              "resolution": args.resolution, "measurements": measurements,
              "rows": summarise(measurements, steps)}
    write_results(args.output, result, render(result))
    print(render(result))


if __name__ == "__main__":
    run_main(main)
