"""Equal pretraining budgets for every method: throughput calibrated once, then a fixed number of steps.

A wall-clock budget is turned into optimizer steps *before* training: each method's steps/s is measured on two
short runs of its own training script (10 and 60 steps; the difference leaves out start-up and kernel warm-up),
with nothing else running, and stored in `WORK_DIR/calibration/METHOD.json`. A budget of M minutes is then
`M * 60 * steps/s` steps, and the learning-rate schedule is laid over exactly those steps. Training then stops on
steps, never on the clock, so a run's result does not depend on what else the machine did meanwhile (the minutes it
really took are still recorded in its summary), and every budget of a method uses one calibration.

Used by `brain_tumor_mri.py`, `ablations.py` and `budget_curve.py`.
"""

import json
import logging
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from mic_diffrep.utils import environment_info  # noqa: E402


logger = logging.getLogger("benchmark")

CALIBRATION_STEPS = (10, 60)
BASELINES = ("mocov2", "byol", "mae")


def common_argv(data_dir: str, work_dir: str, resolution: int, seed: int) -> List[str]:
    return ["--train_data_dir", os.path.join(data_dir, "Training"), "--resolution", str(resolution),
            "--mixed_precision", "bf16", "--seed", str(seed), "--logger", "none",
            "--cache_dir", os.path.join(work_dir, "decoded")]


def method_argv(method: str, recipe_argv: Sequence[str] = ()) -> List[str]:
    """Flags of one method's pretraining script beyond the common ones: `--method` for the baselines, no sample grids
    and no intermediate pipeline saves for the diffusion model (the benchmark samples once, after training)."""
    if method in BASELINES:
        return ["--method", method, *recipe_argv]
    return ["--save_images_epochs", "0", "--save_model_epochs", "1000000", *recipe_argv]


def run_pretraining(method: str, argv: List[str]) -> dict:
    """Runs `training/pretrain.py` (diffusion) or `training/pretrain_baseline.py` in this process; returns the
    summary it writes."""
    if method in BASELINES:
        from mic_diffrep.baseline_pretraining import main, parse_args
    else:
        from mic_diffrep.pretraining import main, parse_args
    logger.info("Pretraining %s: %s", method, " ".join(argv))
    return main(parse_args(argv))


def calibrate(method: str, name: str, work_dir: str, base_argv: List[str]) -> dict:
    """Steps/s of one method (and recipe `name`), measured once and cached in `WORK_DIR/calibration/NAME.json`."""
    path = os.path.join(work_dir, "calibration", f"{name}.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
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
    images_per_step = summaries[1]["images_seen"] / CALIBRATION_STEPS[1]
    result = {"method": method, "name": name, "steps_per_second": steps_per_second,
              "images_per_second": steps_per_second * images_per_step, "calibration_steps": list(CALIBRATION_STEPS),
              "calibration_seconds": seconds, "argv": base_argv, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
              "environment": environment_info()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    logger.info("%s: %.3f steps/s (%.1f images/s) measured before pretraining", name, steps_per_second,
                result["images_per_second"])
    return result


def pretrain_for_budget(method: str, minutes: float, work_dir: str, data_dir: str, resolution: int = 64, seed: int = 0,
                        recipe_argv: Sequence[str] = (), name: Optional[str] = None) -> Dict:
    """Pretrains `method` (a baseline, or `"micdiffrep"` with `recipe_argv`) for `minutes` of its calibrated
    throughput; returns `{"output_dir", "summary", "calibration", "budget_minutes", "planned_steps"}`. A finished run
    (its `pretraining_summary.json` exists) is reused."""
    name = name or method
    base_argv = common_argv(data_dir, work_dir, resolution, seed) + method_argv(method, recipe_argv)
    calibration = calibrate(method, name, work_dir, base_argv)
    steps = max(1, int(minutes * 60 * calibration["steps_per_second"]))
    output_dir = os.path.join(work_dir, f"{name}-{minutes:g}min")
    summary_file = os.path.join(output_dir, "pretraining_summary.json")
    if os.path.isfile(summary_file):
        logger.info("Reusing %s", output_dir)
        with open(summary_file) as f:
            summary = json.load(f)
    else:
        summary = run_pretraining(method, base_argv + [
            "--output_dir", output_dir, "--max_train_steps", str(steps), "--checkpointing_steps", "1000",
            "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest"])
    return {"output_dir": output_dir, "summary": summary, "calibration": calibration, "budget_minutes": minutes,
            "planned_steps": steps}


def main():
    """Pretrains the given methods for the given budgets (the first stage of the benchmarks, runnable alone)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--data_dir", default=os.path.join(REPO, "..", "shared", "data", "brain-tumor-mri"))
    parser.add_argument("--work_dir", default=os.path.join(REPO, "runs", "benchmark"))
    parser.add_argument("--methods", nargs="+", default=list(BASELINES), choices=list(BASELINES))
    parser.add_argument("--minutes", type=float, nargs="+", default=[30.0])
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    for method in args.methods:  # every calibration first, while the machine is quiet
        calibrate(method, method, args.work_dir, common_argv(args.data_dir, args.work_dir, args.resolution, 0)
                  + method_argv(method))
    for minutes in args.minutes:
        for method in args.methods:
            pretrain_for_budget(method, minutes, args.work_dir, args.data_dir, args.resolution)


if __name__ == "__main__":
    main()
