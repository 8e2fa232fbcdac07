#!/usr/bin/env python
"""Pretraining, feature-extraction and generation speed on this machine, side by side in one run, against the
CPU's measured bf16 matmul peak.

    python benchmarks/throughput.py   # writes benchmarks/results/throughput.{json,md}; run profile_cpu.py first

- **Peak**: a 2048 x 2048 bf16 (and fp32) matmul, repeated; FLOP/s = 2 n^3 / time.
- **Pretraining**: the package's training loop (`mic_diffrep.training.pretrain`: decoded images, bf16 autocast,
  batch 32, 64 px, default UNet), timed as the difference of a 10-step and a 60-step run (start-up and warm-up left
  out), against a plain fp32 diffusers-style loop in the shape of `train_unconditional.py` (JPEGs decoded and
  transformed on the fly, no autocast) on the same UNet, timed the same way.
- **Feature extraction**: `DiffusionFeaturePipeline.extract_features` in bf16 weights, all blocks, one timestep.
- **Generation**: DDIM with 50 steps, 16 images per batch, bf16 weights.
- FLOPs per image are counted with `torch.utils.flop_counter.FlopCounterMode` on the same computation (a training
  step counts forward and backward), not estimated.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from typing import List, Optional

import PIL.Image
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (OVERWRITE_HELP, REPO, HelpFormatter, check_recorded_results, command_line,  # noqa: E402
                    environment_info, output_prefix, run_main, write_results)
from diffusers import DDIMScheduler  # noqa: E402
from mic_diffrep import DiffusionFeaturePipeline  # noqa: E402
from mic_diffrep.commands import SAMPLE_DATA_DIR  # noqa: E402
from mic_diffrep.data import ImagePreprocessing, pixels_to_model_input  # noqa: E402
from mic_diffrep.inference import image_files  # noqa: E402
from mic_diffrep.models.mic_diffrep.unet import create_scheduler, create_unet  # noqa: E402
from mic_diffrep.training import PretrainingArguments, pretrain  # noqa: E402


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def ours_training(data_dir: str, batch_size: int, preset: str) -> float:
    """Images/s of `mic_diffrep.training.pretrain` (bf16): the difference of a 10-step and a 60-step run."""
    seconds = []
    for steps in (10, 60):
        with tempfile.TemporaryDirectory() as out:
            summary = pretrain(PretrainingArguments(
                train_data_dir=data_dir, output_dir=out, resolution=64, mixed_precision="bf16",
                model_config_name_or_path=preset,
                train_batch_size=batch_size, max_train_steps=steps, save_images_epochs=0, save_model_epochs=10**6,
                checkpointing_steps=10**6, logger="none", cache_dir=os.path.join(tempfile.gettempdir(), "throughput")))
        seconds.append(60 * summary["train_minutes"])
    return 50 * batch_size / (seconds[1] - seconds[0])


class _OnTheFly(torch.utils.data.Dataset):
    """`train_unconditional.py`'s data path: open the JPEG, convert, resize, flip, normalise, every epoch."""

    def __init__(self, paths, preprocessing):
        self.paths, self.preprocessing = paths, preprocessing

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with PIL.Image.open(self.paths[index]) as image:
            pixels = self.preprocessing(image)
        if torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        return pixels_to_model_input(pixels)


def plain_training(paths, batch_size: int, preset: str) -> float:
    """Images/s of a plain fp32 loop (decode on the fly, no autocast): the difference of 10 and 60 steps."""
    torch.manual_seed(0)
    unet, scheduler = create_unet(64, preset), create_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    loader = torch.utils.data.DataLoader(_OnTheFly(paths, ImagePreprocessing(64)), batch_size=batch_size,
                                         shuffle=True, drop_last=True)
    times, step = {}, 0
    start = time.perf_counter()
    while step < 60:
        for batch in loader:
            noise = torch.randn_like(batch)
            timesteps = torch.randint(0, 1000, (len(batch),))
            loss = F.mse_loss(unet(scheduler.add_noise(batch, noise, timesteps), timesteps).sample, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step in (10, 60):
                times[step] = time.perf_counter() - start
            if step == 60:
                break
    return 50 * batch_size / (times[60] - times[10])


def training_flops_per_image(batch_size: int, preset: str) -> float:
    unet, scheduler = create_unet(64, preset), create_scheduler()
    images = torch.rand(batch_size, 1, 64, 64) * 2 - 1

    def step():
        noise = torch.randn_like(images)
        timesteps = torch.randint(0, 1000, (batch_size,))
        F.mse_loss(unet(scheduler.add_noise(images, noise, timesteps), timesteps).sample, noise).backward()

    return count_flops(step) / batch_size


def training_step_speed(compile_model: bool, preset: str, batch_size: int = 32, steps: int = 15):
    """Images/s of a bare bf16-autocast training step on the default UNet, eager or `torch.compile`d (inductor), and
    the seconds the first (compiling) step took."""
    torch.manual_seed(0)
    unet, scheduler = create_unet(64, preset), create_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    model = torch.compile(unet) if compile_model else unet
    images = torch.rand(batch_size, 1, 64, 64) * 2 - 1

    def step():
        noise = torch.randn_like(images)
        timesteps = torch.randint(0, 1000, (batch_size,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prediction = model(scheduler.add_noise(images, noise, timesteps), timesteps).sample
        F.mse_loss(prediction.float(), noise).backward()
        optimizer.step()
        optimizer.zero_grad()

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * steps / (time.perf_counter() - start), first


def extraction(batch_size: int, num_images: int, preset: str):
    torch.manual_seed(0)
    pipe = DiffusionFeaturePipeline(create_unet(64, preset), create_scheduler()).to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    pixels = torch.randint(0, 256, (num_images, 1, 64, 64), dtype=torch.uint8)
    pipe.extract_features(pixels[:batch_size], [100], batch_size=batch_size, preprocessed=True)  # warm-up
    start = time.perf_counter()
    pipe.extract_features(pixels, [100], batch_size=batch_size, preprocessed=True)
    seconds = time.perf_counter() - start
    flops = count_flops(lambda: pipe.extract_features(pixels[:batch_size], [100], batch_size=batch_size,
                                                      preprocessed=True)) / batch_size
    return num_images / seconds, flops


def generation(batch_size: int, preset: str, steps: int = 50):
    torch.manual_seed(0)
    unet = create_unet(64, preset).to(torch.bfloat16)
    pipe = DiffusionFeaturePipeline(unet, DDIMScheduler.from_config(create_scheduler().config))
    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=batch_size, num_inference_steps=3)  # warm-up
    start = time.perf_counter()
    pipe(batch_size=batch_size, num_inference_steps=steps, output_type="np")
    seconds = (time.perf_counter() - start) / batch_size
    flops = count_flops(lambda: pipe(batch_size=1, num_inference_steps=steps, output_type="np"))
    return seconds, flops


def _range(values) -> str:
    low, high = min(values), max(values)
    return f"{low:.0f}%" if round(low) == round(high) else f"{low:.0f}-{high:.0f}%"


def limits(result: dict, profile: Optional[dict]) -> List[str]:
    """The "what limits it" part of the results file: the CPU-time shares of `profile` (`profile_cpu.py`'s
    `profile.json`) by workload, and what the measured speeds say about the 2.5x target and `torch.compile`."""
    rows = {row["name"].split(" (")[0]: row for row in result["rows"]}
    peak = result["peak_flops"]["bf16"]
    ours, plain = rows["pretraining, mic-diffrep loop"], rows["pretraining, plain fp32 loop"]
    eager, compiled = rows["bare training step, eager"], rows["bare training step, torch.compile"]
    lines = ["## What limits it", ""]
    if profile:
        parts = profile["parts"]
        lines += [f"Shares of the self CPU time in `torch.profiler` (`{profile['command']}`, UNet "
                  f"`{profile['unet']}`; op tables in `benchmarks/results/profile_*.md`):", "",
                  "| category | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
        labels = list(dict.fromkeys(label for part in parts.values() for label in part["categories"]))
        lines += [f"| {label} | " + " | ".join(f"{part['categories'].get(label, 0):.1f}%" for part in parts.values())
                  + " |" for label in labels]
        convolution = [part["categories"].get("convolution", 0) for part in parts.values()]
        backward = sum(op["share"] for op in parts["pretraining"]["ops"] if op["name"] == "aten::convolution_backward")
        lines += ["", f"Convolutions (oneDNN) take {_range(convolution)} of the CPU time in all {len(parts)} "
                  f"workloads; their backward alone {backward:.0f}% of a training step."]
        if profile["unet"] != result.get("unet", "base"):
            lines += [f"The profile is of UNet `{profile['unet']}`, the speeds above of "
                      f"`{result.get('unet', 'base')}`."]
    else:
        lines += ["No profile (`python benchmarks/profile_cpu.py` writes one)."]
    needed = 2.5 * plain["flops_per_second"] / peak
    lines += ["", f"The mic-diffrep loop runs at {100 * ours['flops_per_second'] / peak:.0f}% of the bf16 matmul peak; "
              f"the 2.5x target over the plain fp32 loop would need {100 * needed:.0f}% of it"
              + (" (more than the peak)." if needed > 1 else "."),
              f"`torch.compile` (inductor) made the bare training step "
              f"{'slower' if compiled['images_per_second'] < eager['images_per_second'] else 'faster'} "
              f"({compiled['images_per_second']:.1f} vs {eager['images_per_second']:.1f} images/s eager)"
              + (", so it is not offered." if compiled["images_per_second"] < eager["images_per_second"] else "."), ""]
    return lines


def markdown(result: dict, profile: Optional[dict] = None) -> str:
    env, peak = result["environment"], result["peak_flops"]
    rows = result["rows"]

    def share(flops_per_second):
        return f"{flops_per_second / 1e9:.0f} GFLOP/s ({100 * flops_per_second / peak['bf16']:.0f}% of bf16 peak)"

    lines = [
        "# Throughput: pretraining, feature extraction, generation", "",
        f"Command: `{result['command']}`  ",
        f"Machine: {env['processor']}, {env['cpu_count']} CPUs, {env['torch_num_threads']} torch threads; torch "
        f"{env['torch']}, diffusers {env['diffusers']}", "",
        f"UNet `{result.get('unet', 'base')}`"
        + (f" ({result['num_parameters'] / 1e6:.2f}M parameters)" if "num_parameters" in result else "") + " at 64 px. "
        "Measured in one run, one after the other. "
        "FLOPs counted with `torch.utils.flop_counter.FlopCounterMode`.", "",
        f"Matmul peak (2048 x 2048, this run): bf16 {peak['bf16'] / 1e12:.2f} TFLOP/s, fp32 "
        f"{peak['fp32'] / 1e12:.2f} TFLOP/s.", "",
        "| what | speed | GFLOP per image | achieved | target | |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['name']} | {row['speed']} | {row['gflop_per_image']:.2f} | "
                     f"{share(row['flops_per_second'])} | {row.get('target', '')} | {row.get('verdict', '')} |")
    lines += ["", f"Pretraining speed-up over the plain fp32 loop: **{result['pretraining_speedup']:.2f}x** "
              f"(target 2.5x: {'met' if result['pretraining_speedup'] >= 2.5 else 'NOT met'}).", ""]
    lines += limits(result, profile)
    if result.get("notes"):
        lines += [f"- {note}" for note in result["notes"]] + [""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_dir", default=SAMPLE_DATA_DIR, help="JPEGs to train on (content does not matter).")
    parser.add_argument("--output", type=output_prefix,
                        default=os.path.join(REPO, "benchmarks", "results", "throughput"))
    parser.add_argument("--extraction_batch_sizes", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--note", action="append", default=[], help="A sentence for the results file.")
    parser.add_argument("--unet", default="base", help="UNet preset measured (the results file: 'base', the default "
                                                       "of the first benchmarks; the package default is 'small').")
    parser.add_argument("--profile", default=os.path.join(REPO, "benchmarks", "results", "profile.json"),
                        help="`benchmarks/profile_cpu.py`'s profile.json, summarised under \"What limits it\".")
    parser.add_argument("--recorded_only", action="store_true",
                        help="Measure nothing: render OUTPUT.md again from OUTPUT.json and --profile.")
    parser.add_argument("--overwrite_output", action="store_true", help=OVERWRITE_HELP)
    args = parser.parse_args()
    profile = None
    if os.path.isfile(args.profile):
        with open(args.profile) as f:
            profile = json.load(f)
    if args.recorded_only:
        if not os.path.isfile(args.output + ".json"):
            parser.error(f"--recorded_only renders {args.output}.json, which does not exist.")
        with open(args.output + ".json") as f:
            result = json.load(f)
        write_results(args.output, result, markdown(result, profile))
        print(markdown(result, profile))
        return

    check_recorded_results(args.output, args.overwrite_output)
    peak = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    paths = image_files([args.data_dir])
    preset = args.unet
    ours = ours_training(args.data_dir, 32, preset)
    plain = plain_training(paths, 32, preset)
    train_flops = training_flops_per_image(32, preset)
    extractions = {batch: extraction(batch, 1024, preset) for batch in args.extraction_batch_sizes}
    seconds_per_image, generation_flops = generation(16, preset)
    eager, eager_first = training_step_speed(False, preset)
    compiled, compile_seconds = training_step_speed(True, preset)
    rows = [
        {"name": "pretraining, mic-diffrep loop (bf16 autocast, decoded once)", "speed": f"{ours:.1f} images/s",
         "images_per_second": ours, "gflop_per_image": train_flops / 1e9, "flops_per_second": ours * train_flops,
         "target": ">= 40 images/s", "verdict": "met" if ours >= 40 else "NOT met"},
        {"name": "pretraining, plain fp32 loop (JPEGs decoded on the fly)", "speed": f"{plain:.1f} images/s",
         "images_per_second": plain, "gflop_per_image": train_flops / 1e9, "flops_per_second": plain * train_flops},
        *[{"name": f"feature extraction (all blocks, one timestep, bf16 weights, batch {batch})",
           "speed": f"{speed:.1f} images/s", "images_per_second": speed, "batch_size": batch,
           "gflop_per_image": flops / 1e9, "flops_per_second": speed * flops, "target": ">= 150 images/s",
           "verdict": "met" if speed >= 150 else "NOT met"} for batch, (speed, flops) in extractions.items()],
        {"name": "DDIM-50 generation (batch 16, bf16)", "speed": f"{seconds_per_image:.3f} s per image",
         "seconds_per_image": seconds_per_image, "gflop_per_image": generation_flops / 1e9,
         "flops_per_second": generation_flops / seconds_per_image, "target": "<= 0.3 s per image",
         "verdict": "met" if seconds_per_image <= 0.3 else "NOT met"},
        {"name": "bare training step, eager (bf16 autocast, batch 32)", "speed": f"{eager:.1f} images/s",
         "images_per_second": eager, "gflop_per_image": train_flops / 1e9, "flops_per_second": eager * train_flops},
        {"name": f"bare training step, torch.compile (inductor; first step {compile_seconds:.0f} s)",
         "speed": f"{compiled:.1f} images/s", "images_per_second": compiled, "compile_seconds": compile_seconds,
         "gflop_per_image": train_flops / 1e9, "flops_per_second": compiled * train_flops},
    ]
    result = {"command": command_line(),
              "environment": environment_info(), "peak_flops": peak, "rows": rows,
              "pretraining_speedup": ours / plain, "notes": args.note, "unet": preset,
              "num_parameters": sum(p.numel() for p in create_unet(64, preset).parameters())}
    write_results(args.output, result, markdown(result, profile))
    print(markdown(result, profile))


if __name__ == "__main__":
    run_main(main)
