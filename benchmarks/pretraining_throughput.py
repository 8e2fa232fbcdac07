#!/usr/bin/env python
"""Pretraining throughput (images/s) and peak memory on this machine: default 4.3M-parameter UNet, 64 and 112 px,
fp32 vs bf16, measured by running `training/pretrain.py` itself for a fixed wall-clock time per configuration.

    python benchmarks/pretraining_throughput.py            # writes benchmarks/results/pretraining_throughput.{json,md}
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mic_diffrep.cli import SAMPLE_DATA_DIR  # noqa: E402
from mic_diffrep.utils import environment_info  # noqa: E402


def run_config(data_dir, resolution, precision, minutes, extra=()):
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, os.path.join(REPO, "training", "pretrain.py"), "--train_data_dir", data_dir,
            "--output_dir", out, "--resolution", str(resolution), "--mixed_precision", precision,
            "--time_budget_minutes", str(minutes), "--num_epochs", "1000", "--logger", "none",
            "--save_images_epochs", "100000", "--save_model_epochs", "100000", "--checkpointing_steps", "1000000",
            "--ddpm_num_inference_steps", "1", "--eval_batch_size", "1", *extra,
        ]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(os.path.join(out, "pretraining_summary.json")) as f:
            return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=SAMPLE_DATA_DIR, help="Images to train on (content does not matter).")
    parser.add_argument("--minutes", type=float, default=1.0, help="Training time per configuration.")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "pretraining_throughput"))
    args = parser.parse_args()

    rows = []
    for resolution in (64, 112):
        for precision in ("no", "bf16"):
            summary = run_config(args.data_dir, resolution, precision, args.minutes)
            rows.append({
                "resolution": resolution, "mixed_precision": precision, "batch_size": 32,
                "num_parameters": summary["num_parameters"], "images_per_second": summary["images_per_second"],
                "peak_memory_mb": summary["peak_memory_mb"], "steps": summary["global_step"],
            })
            print(rows[-1], flush=True)
    result = {"command": "python " + " ".join(sys.argv), "environment": environment_info(), "results": rows,
              "target": "bf16, ~4M-parameter UNet, 64 px: >= 30 images/s"}
    with open(args.output + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        "# Pretraining throughput", "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['environment']['processor']}, {result['environment']['cpu_count']} CPUs, "
        f"torch {result['environment']['torch']}, diffusers {result['environment']['diffusers']}", "",
        "Each row trains the default UNet with `training/pretrain.py` for a fixed wall-clock time (batch 32, Adam, "
        "decoded images in memory) and reads images/s and peak resident memory from `pretraining_summary.json`.", "",
        "| resolution | precision | parameters | images/s | peak memory (MiB) |", "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['resolution']} | {r['mixed_precision']} | {r['num_parameters'] / 1e6:.2f}M | "
                     f"{r['images_per_second']:.1f} | {r['peak_memory_mb']:.0f} |")
    bf16_64 = next(r for r in rows if r["resolution"] == 64 and r["mixed_precision"] == "bf16")
    verdict = "met" if bf16_64["images_per_second"] >= 30 else "NOT met"
    lines += ["", f"Target (bf16, 64 px, >= 30 images/s): {verdict} ({bf16_64['images_per_second']:.1f} images/s)."]
    with open(args.output + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
