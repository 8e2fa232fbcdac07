#!/usr/bin/env python
"""Where the time goes: `torch.profiler` op tables of pretraining, feature extraction and DDIM generation.

    python benchmarks/profile_cpu.py   # writes benchmarks/results/profile_{pretraining,extraction,generation}.md
                                       # and profile.json, which benchmarks/throughput.py summarises

Each part runs the package's own code path on the `base` UNet (`--unet`) at 64 px, bf16 (autocast for training,
bf16 weights for extraction and generation), warms up, then profiles a few iterations. Tables are sorted by self CPU
time and grouped into the categories the optimisation work asks about (convolutions, GroupNorm, SiLU, attention,
dtype casts, optimizer, pooling, other).
"""

import argparse
import json
import os
import sys
import time
from typing import Dict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (OVERWRITE_HELP, REPO, HelpFormatter, check_recorded_results, command_line,  # noqa: E402
                    environment_info, positive_int, run_main, writable_folder)
from diffusers import DDIMScheduler  # noqa: E402
from mic_diffrep import DiffusionFeaturePipeline  # noqa: E402
from mic_diffrep.data.augmentations import PretrainingAugment  # noqa: E402
from mic_diffrep.models.mic_diffrep.unet import create_scheduler, create_unet  # noqa: E402
from mic_diffrep.training import PretrainingArguments  # noqa: E402
from mic_diffrep.training.diffusion import diffusion_loss  # noqa: E402


CATEGORIES = [
    ("convolution", ("conv", "mkldnn_convolution", "convolution")),
    ("matmul / linear (attention projections, time embedding)", ("addmm", "mm", "bmm", "linear", "matmul")),
    ("attention (softmax, scaled dot product)", ("softmax", "scaled_dot_product", "_flash_attention", "baddbmm")),
    ("group norm", ("group_norm", "native_group_norm")),
    ("SiLU", ("silu",)),
    ("dtype casts and copies", ("to", "_to_copy", "copy_", "clone", "contiguous")),
    ("optimizer (AdamW)", ("adam", "_foreach", "lerp", "addcmul", "addcdiv", "sqrt", "maximum")),
    ("pooling (feature hooks)", ("mean", "amax", "adaptive_avg_pool")),
    ("interpolation (up/down sampling)", ("upsample", "interpolate", "avg_pool")),
]


def category(name: str) -> str:
    short = name.split("::")[-1].lower()
    for label, keys in CATEGORIES:
        if any(short == key or short.startswith(key) or key in short for key in keys):
            return label
    return "other (elementwise, autograd bookkeeping, ...)"


def summarise(prof, title: str, seconds: float, iterations: int, unit: str) -> Dict:
    """The profile of one workload: its categories' and its top ops' shares of the self CPU time (in %)."""
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    by_category = {}
    for event in events:
        by_category[category(event.key)] = by_category.get(category(event.key), 0) + event.self_cpu_time_total
    return {"title": title, "seconds": seconds, "iterations": iterations, "unit": unit,
            "categories": {label: 100 * value / total
                           for label, value in sorted(by_category.items(), key=lambda item: -item[1])},
            "ops": [{"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000,
                     "share": 100 * e.self_cpu_time_total / total}
                    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]]}


def table(part: Dict) -> str:
    """One workload's profile (`summarise`) as markdown tables."""
    unit, seconds, iterations = part["unit"], part["seconds"], part["iterations"]
    lines = [f"## {part['title']}", "", f"{iterations} {unit} profiled, {seconds:.2f} s wall in all "
             f"({seconds / iterations:.3f} s per {unit[:-2] if unit.endswith('ches') else unit.rstrip('s')}).", "",
             "| category | share of self CPU time |", "|---|---|"]
    lines += [f"| {label} | {share:.1f}% |" for label, share in part["categories"].items()]
    lines += ["", "| op | calls | self CPU ms | share |", "|---|---|---|---|"]
    lines += [f"| `{op['name']}` | {op['calls']} | {op['self_cpu_ms']:.1f} | {op['share']:.1f}% |"
              for op in part["ops"]]
    return "\n".join(lines) + "\n"


# The UNet profiled by default: the 4.3M-parameter "base" preset, which `benchmarks/throughput.py` measures too.
PRESET = "base"


def profile_pretraining(batch_size: int, iterations: int, preset: str = PRESET) -> Dict:
    torch.manual_seed(0)
    unet, scheduler = create_unet(64, preset), create_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    args = PretrainingArguments(train_data_dir=".", resolution=64)
    images = torch.rand(batch_size, 1, 64, 64) * 2 - 1

    def step(seed):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = diffusion_loss(unet, scheduler, images, torch.Generator().manual_seed(seed), args,
                                  PretrainingAugment())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    for seed in range(3):
        step(seed)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for seed in range(iterations):
            step(seed)
    return summarise(prof, f"Pretraining step (batch {batch_size}, 64 px, bf16 autocast, AdamW)",
                 time.perf_counter() - start, iterations, "steps")


def profile_extraction(batch_size: int, iterations: int, preset: str = PRESET) -> Dict:
    torch.manual_seed(0)
    pipe = DiffusionFeaturePipeline(create_unet(64, preset), create_scheduler()).to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    pixels = torch.randint(0, 256, (batch_size, 1, 64, 64), dtype=torch.uint8)
    pipe.extract_features(pixels, [100], batch_size=batch_size, preprocessed=True)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iterations):
            pipe.extract_features(pixels, [100], batch_size=batch_size, preprocessed=True)
    return summarise(prof, f"Feature extraction (all blocks, one timestep, batch {batch_size}, 64 px, bf16 weights)",
                 time.perf_counter() - start, iterations, "batches")


def profile_generation(batch_size: int, steps: int, preset: str = PRESET) -> Dict:
    torch.manual_seed(0)
    unet = create_unet(64, preset).to(torch.bfloat16)
    pipe = DiffusionFeaturePipeline(unet, DDIMScheduler.from_config(create_scheduler().config))
    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=batch_size, num_inference_steps=3)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        pipe(batch_size=batch_size, num_inference_steps=steps, output_type="np")
    return summarise(prof, f"DDIM generation ({steps} steps, batch {batch_size}, 64 px, bf16 weights)",
                 time.perf_counter() - start, steps, "steps")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output_dir", type=writable_folder, default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument("--iterations", type=positive_int, default=5)
    parser.add_argument("--unet", default=PRESET, help="UNet preset profiled.")
    parser.add_argument("--overwrite_output", action="store_true", help=OVERWRITE_HELP)
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    check_recorded_results(os.path.join(args.output_dir, "profile"), args.overwrite_output)
    env = environment_info()
    parts = {"pretraining": profile_pretraining(32, args.iterations, args.unet),
             "extraction": profile_extraction(16, 8 * args.iterations, args.unet),
             "generation": profile_generation(16, 20, args.unet)}
    result = {"command": command_line(), "environment": env, "unet": args.unet, "parts": parts}
    with open(os.path.join(args.output_dir, "profile.json"), "w") as f:  # what `throughput.py` summarises
        json.dump(result, f, indent=2)
    header = (f"Command: `{result['command']}`  \nMachine: {env['processor']}, {env['cpu_count']} CPUs, "
              f"{env['torch_num_threads']} torch threads; torch {env['torch']}, diffusers {env['diffusers']}\n\n"
              f"UNet `{args.unet}` at 64 px (random weights: the time does not depend on them).\n\n")
    for name, part in parts.items():
        with open(os.path.join(args.output_dir, f"profile_{name}.md"), "w") as f:
            f.write(f"# Profile: {name}\n\n" + header + table(part))
        print(table(part))


if __name__ == "__main__":
    run_main(main)
