"""Pretraining of the paper's self-supervised baselines (MAE, MoCo v2, BYOL) under the diffusion pretraining's rules.

    accelerate launch training/pretrain_baseline.py --method byol --train_data_dir DIR --output_dir runs/byol \\
        --time_budget_minutes 30 --mixed_precision bf16

The same loop as diffusion pretraining (`mic_diffrep.training.loop`): data loading (splits, decoding once,
resolution, padding, intensity window), budget flags (`--max_train_steps`, `--time_budget_minutes`), checkpointing
(`--checkpointing_steps`, `--resume_from_checkpoint latest`) and mixed precision. The output folder
(`baseline_config.json`, `model.safetensors`) is what `training/linear_probe.py --pretrained` takes, so every method
is scored by the same probe.
"""

import logging
import os

import torch

from ..models.baselines import create_baseline, save_baseline
from ..utils import (SUMMARY_FILE, command_line, environment_info, output_folder, peak_memory_mb, tracker_config,
                     write_json)
from .arguments import BaselinePretrainingArguments
from .checkpointing import check_new_run
from .loop import (TrainingState, end_trackers, load_training_images, make_accelerator, make_dataloader,
                   plan_schedule, summary_stop_reason, train)


logger = logging.getLogger(__name__)


def pretrain_baseline(args: BaselinePretrainingArguments) -> dict:
    """Pretrains `args.method` and writes its folder; returns the summary also written to
    `pretraining_summary.json`."""
    with output_folder(args.output_dir, kind="baseline", data_folders=(args.train_data_dir,)):
        check_new_run(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
        return _pretrain_baseline(args)


def _pretrain_baseline(args: BaselinePretrainingArguments) -> dict:
    accelerator = make_accelerator(args, log_with=None if args.logger == "none" else args.logger)
    torch.manual_seed(args.seed)

    decoded, splits = load_training_images(args, accelerator)
    dataset, loader = make_dataloader(decoded, args, drop_last=True)
    model = create_baseline(args.method, args.resolution, resize_mode=args.resize_mode,
                            intensity_window=args.intensity_window, **args.slice_settings)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                                  eps=args.adam_epsilon)
    max_train_steps, num_epochs, lr_scheduler = plan_schedule(args, loader, optimizer, accelerator)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    if accelerator.is_main_process and args.logger != "none":
        accelerator.init_trackers(f"mic-diffrep-pretrain-{args.method}", config=tracker_config(args))
    logger.info("Pretraining %s on %d images (%s), %d steps", args.method, len(decoded), splits, max_train_steps)

    def compute_loss(model, pixel_values, generator):
        with accelerator.autocast():
            return model(pixel_values, generator=generator)

    def after_step(state: TrainingState) -> None:
        # Momentum / EMA targets follow the online networks; BYOL's schedule depends on the progress of training.
        accelerator.unwrap_model(model).after_optimizer_step((state.global_step - 1) / max_train_steps)

    state = train(accelerator, model, loader, dataset, optimizer, lr_scheduler, args, max_train_steps, num_epochs,
                  compute_loss, after_step, desc=f"Pretraining {args.method}")
    minutes = state.train_seconds / 60
    summary = {"command": command_line(), "method": args.method, "num_images": len(decoded), "splits": splits,
               "exclude_image_list": args.exclude_image_list,
               "resolution": args.resolution, "num_processes": accelerator.num_processes,
               "mixed_precision": accelerator.mixed_precision,
               "global_step": state.global_step, "stop_reason": summary_stop_reason(state, args),
               "final_loss": state.last_loss, "train_minutes": minutes, "images_seen": state.images_seen,
               "images_per_second": state.images_seen / (60 * minutes) if minutes > 0 else None,
               "num_parameters": sum(p.numel() for p in accelerator.unwrap_model(model).parameters()),
               "peak_memory_mb": peak_memory_mb(), "environment": environment_info()}
    if accelerator.is_main_process:
        save_baseline(accelerator.unwrap_model(model), args.output_dir)
        write_json(os.path.join(args.output_dir, SUMMARY_FILE), summary)
    end_trackers(accelerator)
    return summary
