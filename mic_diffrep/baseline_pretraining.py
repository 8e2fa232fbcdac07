"""Pretraining of the paper's self-supervised baselines (MAE, MoCo v2, BYOL) under the diffusion pretraining's rules.

    accelerate launch training/pretrain_baseline.py --method byol --train_data_dir DIR --output_dir runs/byol \\
        --time_budget_minutes 30 --mixed_precision bf16

Same data loading (splits, decoding once, resolution, padding), budget flags (`--max_train_steps`,
`--time_budget_minutes`), checkpointing (`--checkpointing_steps`, `--resume_from_checkpoint latest`) and mixed
precision as `training/pretrain.py`. The output folder (`baseline_config.json`, `model.safetensors`) is what
`training/linear_probe.py --pretrained` takes, so every method is scored by the same probe.
"""

import argparse
import json
import logging
import math
import os
import time
from typing import List, Optional

import torch

from .baselines import METHODS, create_baseline, save_baseline
from .preprocessing import ImagePreprocessing
from .data import PretrainingDataset, decode_images, load_image_folder, seed_for, select_splits
from .pretraining import (add_pretraining_args, check_args, optimization_step, resume_training_state,
                          save_training_state, stop_reason_for)
from .utils import create_accelerator, environment_info, peak_memory_mb


logger = logging.getLogger(__name__)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Pretraining of an MAE, MoCo v2 or BYOL baseline.")
    parser.add_argument("--method", type=str, required=True, choices=METHODS, help="Which baseline to pretrain.")
    add_pretraining_args(parser, diffusion=False)
    parser.set_defaults(resolution=64, train_batch_size=64, learning_rate=1e-3, lr_scheduler="cosine",
                        adam_weight_decay=0.05, output_dir="runs/baseline")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def main(args: argparse.Namespace) -> dict:
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    check_args(args)
    os.makedirs(args.output_dir, exist_ok=True)
    accelerator = create_accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                                     mixed_precision=args.mixed_precision)
    torch.manual_seed(args.seed)

    splits, dataset = select_splits(load_image_folder(args.train_data_dir), args.pretrain_splits)
    with accelerator.main_process_first():
        decoded = decode_images(dataset, ImagePreprocessing(args.resolution, args.resize_mode, args.intensity_window),
                                skip_bad_images=args.skip_bad_images,
                                num_workers=args.dataloader_num_workers,
                                cache_dir=args.cache_dir or os.path.join(args.output_dir, ".cache"),
                                show_progress=accelerator.is_local_main_process)
    train_dataset = PretrainingDataset(decoded.pixels, seed=args.seed, random_flip=not args.no_random_flip)
    loader = torch.utils.data.DataLoader(train_dataset, batch_size=args.train_batch_size, shuffle=False,
                                         drop_last=True, num_workers=args.dataloader_num_workers)
    if len(loader) == 0:
        raise ValueError(f"--train_batch_size {args.train_batch_size} is larger than the {len(decoded)} images.")
    model = create_baseline(args.method, args.resolution, resize_mode=args.resize_mode,
                            intensity_window=args.intensity_window)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                                  eps=args.adam_epsilon)
    steps_per_epoch = math.ceil(math.ceil(len(loader) / accelerator.num_processes) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    global_step, first_epoch, resume_batches = resume_training_state(accelerator, args.output_dir,
                                                                     args.resume_from_checkpoint)
    logger.info("Pretraining %s on %d images (%s), %d steps", args.method, len(decoded), splits, max_train_steps)

    progress = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc=f"Pretraining {args.method}", unit="step")
    start, images_seen, stop_reason, last_loss = time.time(), 0, None, float("nan")
    for epoch in range(first_epoch, num_epochs):
        model.train()
        train_dataset.shuffle_for_epoch(epoch)
        skip = resume_batches if epoch == first_epoch else 0
        for batch_index, batch in enumerate(accelerator.skip_first_batches(loader, skip) if skip else loader,
                                            start=skip):
            generator = torch.Generator().manual_seed(seed_for(args.seed, epoch, batch_index,
                                                               accelerator.process_index))
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = model(batch["pixel_values"], generator=generator)
                optimization_step(accelerator, model, loss, optimizer, lr_scheduler, args.max_grad_norm,
                                  f"epoch {epoch}, batch {batch_index} (step {global_step})")
            images_seen += accelerator.reduce(torch.tensor(len(batch["pixel_values"]), device=accelerator.device),
                                              reduction="sum").item()
            if accelerator.sync_gradients:
                accelerator.unwrap_model(model).after_optimizer_step(global_step / max_train_steps)
                global_step += 1
                last_loss = accelerator.reduce(loss.detach().float(), reduction="mean").item()
                progress.update(1)
                progress.set_postfix(loss=f"{last_loss:.4f}")
                if global_step % args.checkpointing_steps == 0:
                    save_training_state(accelerator, args.output_dir, global_step, epoch, batch_index + 1,
                                        args.checkpoints_total_limit)
                stop_reason = stop_reason_for(accelerator, global_step, max_train_steps, start,
                                              args.time_budget_minutes)
                if stop_reason:
                    break
        if stop_reason:
            break
    progress.close()
    accelerator.wait_for_everyone()
    minutes = (time.time() - start) / 60
    summary = {"method": args.method, "num_images": len(decoded), "splits": splits, "resolution": args.resolution,
               "global_step": global_step, "stop_reason": stop_reason or "num_epochs", "final_loss": last_loss,
               "train_minutes": minutes, "images_seen": images_seen,
               "images_per_second": images_seen / (60 * minutes) if minutes > 0 else None,
               "num_parameters": sum(p.numel() for p in accelerator.unwrap_model(model).parameters()),
               "peak_memory_mb": peak_memory_mb(), "environment": environment_info()}
    if accelerator.is_main_process:
        save_baseline(accelerator.unwrap_model(model), args.output_dir)
        with open(os.path.join(args.output_dir, "pretraining_summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    accelerator.end_training()
    return summary
