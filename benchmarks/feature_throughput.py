#!/usr/bin/env python
"""Feature-extraction and generation speed of `DiffusionFeaturePipeline` on this machine.

Extraction: images/s for all blocks at one timestep (one hooked UNet forward) against a naive loop that runs one
forward per block, for the default UNet at 64 and 112 px in fp32 and bf16. Generation: seconds per image for
DDPM with 1000 steps and DDIM with 50 steps.

    python benchmarks/feature_throughput.py          # writes benchmarks/results/feature_throughput.{json,md}
"""

import argparse
import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from diffusers import DDIMScheduler  # noqa: E402

from mic_diffrep import DiffusionFeaturePipeline  # noqa: E402
from mic_diffrep.unet import create_scheduler, create_unet  # noqa: E402
from mic_diffrep.utils import environment_info  # noqa: E402


def naive_extract(pipe, pixels, timestep, batch_size, mixed_precision):
    """One full UNet forward per block (the hook-per-call approach the pipeline replaces)."""
    for layer in pipe.layer_names:
        pipe.extract_features(pixels, timesteps=[timestep], layers=[layer], batch_size=batch_size,
                              mixed_precision=mixed_precision, show_progress=False)


def full_forward_extract(pipe, pixels, timestep, batch_size, mixed_precision):
    pipe.extract_features(pixels, timesteps=[timestep], batch_size=batch_size, mixed_precision=mixed_precision,
                          show_progress=False)


def timed(fn, *args):
    fn(*args)  # warm-up
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_generated", type=int, default=8)
    parser.add_argument("--generation_resolution", type=int, default=64,
                        help="Resolution at which generation is timed (DDPM-1000 at 112 px takes many minutes on CPU).")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "feature_throughput"))
    args = parser.parse_args()

    torch.manual_seed(0)
    extraction, generation = [], []
    for resolution in (64, 112):
        pipe = DiffusionFeaturePipeline(create_unet(resolution), create_scheduler())
        pipe.set_progress_bar_config(disable=True)
        pixels = torch.randint(0, 256, (args.num_images, 1, resolution, resolution), dtype=torch.uint8)
        for precision in ("no", "bf16"):
            hooked = timed(full_forward_extract, pipe, pixels, 100, args.batch_size, precision)
            naive = timed(naive_extract, pipe, pixels, 100, args.batch_size, precision)
            extraction.append({
                "resolution": resolution, "mixed_precision": precision, "layers": len(pipe.layer_names),
                "images_per_second": args.num_images / hooked, "naive_images_per_second": args.num_images / naive,
                "speedup": naive / hooked,
            })
            print(extraction[-1], flush=True)
        if resolution != args.generation_resolution:
            continue
        for name, steps in (("ddpm", 1000), ("ddim", 50)):
            if name == "ddim":
                pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
            start = time.perf_counter()
            pipe(batch_size=args.num_generated, num_inference_steps=steps, mixed_precision="bf16",
                 generator=torch.Generator().manual_seed(0), show_progress=False)
            seconds = time.perf_counter() - start
            generation.append({"resolution": resolution, "scheduler": name, "num_inference_steps": steps,
                               "mixed_precision": "bf16", "batch_size": args.num_generated,
                               "seconds_per_image": seconds / args.num_generated})
            print(generation[-1], flush=True)

    result = {"command": "python " + " ".join(sys.argv), "environment": environment_info(),
              "extraction": extraction, "generation": generation}
    with open(args.output + ".json", "w") as f:
        json.dump(result, f, indent=2)
    env = result["environment"]
    lines = [
        "# Feature extraction and generation speed", "",
        f"Command: `{result['command']}`  ",
        f"Machine: {env['processor']}, {env['cpu_count']} CPUs, torch {env['torch']}, diffusers {env['diffusers']}", "",
        f"Default 4.3M-parameter UNet (random weights: speed does not depend on them), {args.num_images} images, "
        f"batch {args.batch_size}, timestep 100. *Hooked*: all blocks from one UNet forward "
        "(`extract_features`); *naive*: one forward per block.", "",
        "| resolution | precision | blocks | hooked images/s | naive images/s | speed-up |", "|---|---|---|---|---|---|",
    ]
    for r in extraction:
        lines.append(f"| {r['resolution']} | {r['mixed_precision']} | {r['layers']} | {r['images_per_second']:.1f} | "
                     f"{r['naive_images_per_second']:.1f} | {r['speedup']:.1f}x |")
    lines += ["", f"Generation ({args.num_generated} images per batch, bf16):", "",
              "| resolution | scheduler | steps | seconds per image |", "|---|---|---|---|"]
    for r in generation:
        lines.append(f"| {r['resolution']} | {r['scheduler']} | {r['num_inference_steps']} | {r['seconds_per_image']:.2f} |")
    with open(args.output + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
