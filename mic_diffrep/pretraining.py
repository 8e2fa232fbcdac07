"""DDPM pretraining of a `UNet2DModel` on unlabelled medical images, with `accelerate`.

Run it as `accelerate launch training/pretrain.py --train_data_dir DIR --output_dir OUT` (or
`mic-diffrep pretrain ...`). Flag names follow diffusers' `train_unconditional.py` where the meaning is the same.
The output folder is a diffusers pipeline folder (`model_index.json`, `unet/`, `scheduler/`, safetensors) that
`DiffusionFeaturePipeline.from_pretrained(OUT)` loads.

Reproducibility: data order and flips depend on `(seed, epoch)`, the noise and timesteps of a batch on
`(seed, epoch, batch, process)`, so a run resumed from a checkpoint ends with the same weights as one that never
stopped (exactly so on CPU in fp32).
"""

import argparse
import json
import logging
import math
import os
import shutil
import signal
import time
from typing import List, Optional

import torch
import torch.nn.functional as F

from .preprocessing import ImagePreprocessing
from .data import PretrainingDataset, decode_images, load_image_folder, seed_for, select_splits
from .utils import MIXED_PRECISION_CHOICES, create_accelerator, environment_info, peak_memory_mb


logger = logging.getLogger(__name__)

SUMMARY_FILE = "pretraining_summary.json"


def add_pretraining_args(parser: argparse.ArgumentParser, diffusion: bool = True) -> argparse.ArgumentParser:
    """Adds the pretraining flags to `parser` (shared by `training/pretrain.py` and `mic-diffrep pretrain`).

    `diffusion=False` leaves out the flags that only make sense for a diffusion model (noise schedule, EMA, sample
    grids, Hub upload): the baselines' pretraining (`training/pretrain_baseline.py`) shares the rest.
    """
    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", type=str, required=True,
                      help="Folder of images: loose images, class sub-folders, or split folders such as "
                           "Training/ and Testing/ (or train/, val/, test/) holding class sub-folders.")
    data.add_argument("--pretrain_splits", type=str, nargs="+", default=None,
                      help="Splits to pretrain on (train, validation, test, or 'all'). Default: every split "
                           "except test, so test images are never used unless asked for.")
    data.add_argument("--resolution", type=int, default=112, help="Image size (the paper uses 112).")
    data.add_argument("--resize_mode", type=str, default="pad", choices=["pad", "center_crop"],
                      help="How non-square images become square: pad the short side with black (keeps the whole "
                           "image) or crop the centre.")
    data.add_argument("--intensity_window", type=str, default="percentile", choices=["percentile", "none"],
                      help="Intensity rule: 'percentile' maps each image's 0.5-99.5th percentiles to 0..255 (the same "
                           "for 8- and 16-bit files); 'none' keeps 8-bit images as they are and min-max scales deeper "
                           "ones. Stored with the model and applied again at inference.")
    data.add_argument("--no_random_flip", action="store_true", help="Disable random horizontal flips.")
    data.add_argument("--skip_bad_images", action="store_true",
                      help="Skip unreadable image files (listed in the log and the summary) instead of failing.")
    data.add_argument("--cache_dir", type=str, default=None,
                      help="Folder for decoded-image caches (safetensors). Default: OUTPUT_DIR/.cache.")
    data.add_argument("--dataloader_num_workers", type=int, default=0,
                      help="Processes decoding images (once, before training) and loading batches.")

    model = parser.add_argument_group("model")
    if diffusion:
        _add_diffusion_model_args(model)

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default="runs/pretrain",
                       help="Pipeline folder written at the end; checkpoints, samples and logs go inside it.")
    train.add_argument("--train_batch_size", type=int, default=32, help="Batch size per process (paper: 32).")
    train.add_argument("--num_epochs", type=int, default=200, help="Epochs (paper: 200).")
    train.add_argument("--max_train_steps", type=int, default=None,
                       help="Total optimizer steps; overrides --num_epochs.")
    train.add_argument("--time_budget_minutes", type=float, default=None,
                       help="Stop (and save) after this many minutes of training; the learning-rate schedule is still "
                            "laid out over --max_train_steps / --num_epochs.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Batches accumulated per optimizer step.")
    train.add_argument("--learning_rate", type=float, default=1e-4, help="Initial learning rate (paper: 1e-4).")
    train.add_argument("--lr_scheduler", type=str, default="linear",
                       help='Schedule: "linear" (paper), "cosine", "cosine_with_restarts", "polynomial", "constant", '
                            '"constant_with_warmup".')
    train.add_argument("--lr_warmup_steps", type=int, default=0, help="Warmup steps of the schedule.")
    train.add_argument("--adam_beta1", type=float, default=0.9, help="Adam beta1.")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="Adam beta2.")
    train.add_argument("--adam_weight_decay", type=float, default=0.0, help="Decoupled weight decay (0: plain Adam).")
    train.add_argument("--adam_epsilon", type=float, default=1e-8, help="Adam epsilon.")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables).")
    if diffusion:
        train.add_argument("--use_ema", action="store_true",
                           help="Keep an exponential moving average of the weights; the saved UNet holds the EMA "
                                "weights.")
        train.add_argument("--ema_inv_gamma", type=float, default=1.0, help="EMA warmup inverse multiplicative factor.")
        train.add_argument("--ema_power", type=float, default=3 / 4, help="EMA warmup power.")
        train.add_argument("--ema_max_decay", type=float, default=0.9999, help="Maximum EMA decay.")
    train.add_argument("--mixed_precision", type=str, default=None, choices=MIXED_PRECISION_CHOICES,
                       help="'bf16' autocasts (about 2x faster on CPUs with AMX, and on recent GPUs); 'fp16' is GPU "
                            "only. Default: the accelerate config.")
    train.add_argument("--channels_last", action="store_true", help="Use the channels_last memory format.")
    train.add_argument("--seed", type=int, default=0, help="Seed for initialisation, data order, noise and samples.")

    save = parser.add_argument_group("checkpoints, samples and logging")
    save.add_argument("--checkpointing_steps", type=int, default=500,
                      help="Save a resumable checkpoint (accelerator.save_state) every this many steps.")
    save.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    save.add_argument("--resume_from_checkpoint", type=str, default=None,
                      help='Resume from a checkpoint folder, or "latest" for the newest one in --output_dir.')
    if diffusion:
        save.add_argument("--save_images_epochs", type=int, default=10,
                          help="Write a PNG grid of generated samples every this many epochs and at the end; 0 turns "
                               "sample grids off.")
        save.add_argument("--save_model_epochs", type=int, default=10, help="Save the pipeline every this many epochs.")
        save.add_argument("--eval_batch_size", type=int, default=16, help="Number of samples in each grid.")
        save.add_argument("--sample_scheduler", type=str, default="ddim", choices=["ddim", "ddpm"],
                          help="Sampler of the grids: 'ddim' (cheap: 50 steps of 16 images take ~5 s on 2 CPU cores "
                               "at 64 px) or 'ddpm' (the paper's 1000-step sampler, ~20x slower).")
        save.add_argument("--ddpm_num_inference_steps", type=int, default=None,
                          help="Denoising steps of the grids (default: 50 for ddim, 1000 for ddpm).")
    save.add_argument("--logger", type=str, default="tensorboard", choices=["tensorboard", "wandb", "none"],
                      help="Experiment tracker.")
    save.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    if diffusion:
        save.add_argument("--push_to_hub", action="store_true", help="Upload the pipeline folder to the Hub at the end.")
        save.add_argument("--hub_model_id", type=str, default=None, help="Hub repository (default: output folder name).")
        save.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the stored login).")
        save.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repository as private.")
    return parser


def _add_diffusion_model_args(model) -> None:
    model.add_argument("--model_config_name_or_path", type=str, default=None,
                       help="UNet config: a preset ('default' = 4.3M parameters, 'tiny'), a config.json, or a folder "
                            "holding one. Default: 'default'.")
    model.add_argument("--ddpm_num_steps", type=int, default=1000, help="Diffusion steps of the noise schedule.")
    model.add_argument("--ddpm_beta_schedule", type=str, default="linear", help="Beta schedule (paper: linear).")
    model.add_argument("--prediction_type", type=str, default="epsilon", choices=["epsilon", "sample", "v_prediction"],
                       help="What the UNet predicts (paper: epsilon, the noise).")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DDPM pretraining of a UNet2DModel on unlabelled medical images.")
    args = add_pretraining_args(parser).parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    for name in ("train_batch_size", "num_epochs", "gradient_accumulation_steps", "checkpointing_steps",
                 "save_model_epochs", "eval_batch_size", "ddpm_num_inference_steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if getattr(args, "save_images_epochs", 0) < 0:
        raise ValueError(f"--save_images_epochs must be >= 0 (0: no sample grids), got {args.save_images_epochs}.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError(f"--max_train_steps must be at least 1, got {args.max_train_steps}.")
    if args.resolution <= 0:
        raise ValueError(f"--resolution must be a positive integer, got {args.resolution}.")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be positive, got {args.learning_rate}.")


def _latest_checkpoint(output_dir: str) -> Optional[str]:
    if not os.path.isdir(output_dir):
        return None
    names = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d.split("-", 1)[1].isdigit()]
    if not names:
        return None
    return os.path.join(output_dir, max(names, key=lambda d: int(d.split("-", 1)[1])))


def _prune_checkpoints(output_dir: str, limit: Optional[int]) -> None:
    if limit is None:
        return
    names = sorted(
        (d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d.split("-", 1)[1].isdigit()),
        key=lambda d: int(d.split("-", 1)[1]),
    )
    for name in names[: max(0, len(names) - limit)]:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def _replace_dir(tmp_dir: str, final_dir: str) -> None:
    """Moves `tmp_dir` to `final_dir`; an existing `final_dir` stays intact until the new one is in place."""
    old = None
    if os.path.exists(final_dir):
        old = f"{final_dir}.old-{os.getpid()}"
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def optimization_step(accelerator, model, loss, optimizer, lr_scheduler, max_grad_norm: float, where: str) -> None:
    """Stops on a NaN or infinite loss (naming `where`), else backpropagates, clips and steps optimizer and schedule."""
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"Loss is {loss.item()} at {where}. Lower --learning_rate, try --mixed_precision no, or resume from the "
            f"last checkpoint; saved checkpoints are untouched."
        )
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad()


def stop_reason_for(accelerator, global_step: int, max_train_steps: int, start_time: float,
                    time_budget_minutes: Optional[float]) -> Optional[str]:
    """`"max_train_steps"` or `"time_budget_minutes"` when training should stop, else `None`; every process agrees
    (the slowest process's elapsed time decides)."""
    if global_step >= max_train_steps:
        return "max_train_steps"
    if time_budget_minutes is not None:
        elapsed = torch.tensor(time.time() - start_time, device=accelerator.device)
        if accelerator.reduce(elapsed, reduction="max").item() >= 60 * time_budget_minutes:
            return "time_budget_minutes"
    return None


def save_training_state(accelerator, output_dir: str, global_step: int, epoch: int, batches_done: int,
                        total_limit: Optional[int] = None) -> str:
    """`accelerator.save_state` into `checkpoint-{global_step}`, written under a temporary name and renamed, so a run
    killed at any moment leaves the previous checkpoint loadable. Also records where in the data the run was."""
    final = os.path.join(output_dir, f"checkpoint-{global_step}")
    tmp = f"{final}.tmp"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a run killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "training_state.json"), "w", encoding="utf-8") as f:
            json.dump({"global_step": global_step, "epoch": epoch, "batches_done": batches_done}, f)
        _replace_dir(tmp, final)
        _prune_checkpoints(output_dir, total_limit)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def resume_training_state(accelerator, output_dir: str, resume_from_checkpoint: Optional[str]):
    """Loads a checkpoint (a folder, or `"latest"` in `output_dir`); returns `(global_step, epoch, batches_done)`."""
    if not resume_from_checkpoint:
        return 0, 0, 0
    path = _latest_checkpoint(output_dir) if resume_from_checkpoint == "latest" else resume_from_checkpoint
    if path is None:
        logger.info("No checkpoint in %s: starting a new training run.", output_dir)
        return 0, 0, 0
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--resume_from_checkpoint {path!r} is not a checkpoint folder.")
    logger.info("Resuming from %s", path)
    accelerator.load_state(path)
    with open(os.path.join(path, "training_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    return state["global_step"], state["epoch"], state["batches_done"]


def save_pipeline(pipeline, output_dir: str) -> None:
    """Writes the pipeline files into `output_dir` atomically: each of model_index.json, unet/, scheduler/ is
    written under a temporary name first, so a killed run never leaves a half-written model behind."""
    tmp = os.path.join(output_dir, f".tmp-pipeline-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    for name in sorted(os.listdir(tmp)):
        _replace_dir(os.path.join(tmp, name), os.path.join(output_dir, name))
    shutil.rmtree(tmp, ignore_errors=True)


def main(args: argparse.Namespace) -> dict:
    """Pretrains and writes the pipeline folder; returns the summary also written to `pretraining_summary.json`."""
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DDIMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from .pipelines import DiffusionFeaturePipeline, save_image_grid
    from .unet import create_scheduler, create_unet

    check_args(args)
    os.makedirs(args.output_dir, exist_ok=True)
    accelerator = create_accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.logger == "none" else args.logger,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state)
    set_seed(args.seed)

    # 1. Data: decode every image once (the main process writes the cache, the others read it).
    dataset_dict = load_image_folder(args.train_data_dir)
    splits, dataset = select_splits(dataset_dict, args.pretrain_splits)
    cache_dir = args.cache_dir or os.path.join(args.output_dir, ".cache")
    with accelerator.main_process_first():
        decoded = decode_images(
            dataset, ImagePreprocessing(args.resolution, args.resize_mode, args.intensity_window),
            skip_bad_images=args.skip_bad_images,
            num_workers=args.dataloader_num_workers, cache_dir=cache_dir,
            show_progress=accelerator.is_local_main_process,
        )
    logger.info("Pretraining on %d images of split(s) %s of %s", len(decoded), splits, args.train_data_dir)
    train_dataset = PretrainingDataset(decoded.pixels, seed=args.seed, random_flip=not args.no_random_flip)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.train_batch_size, shuffle=False, num_workers=args.dataloader_num_workers
    )

    # 2. Model, noise schedule, optimizer.
    model = create_unet(args.resolution, args.model_config_name_or_path)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    noise_scheduler = create_scheduler(args.ddpm_num_steps, args.ddpm_beta_schedule, args.prediction_type)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
    )
    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(
            model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
            power=args.ema_power, model_cls=type(model), model_config=model.config,
        )

    num_batches_per_process = math.ceil(len(train_dataloader) / accelerator.num_processes)
    num_update_steps_per_epoch = math.ceil(num_batches_per_process / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * num_update_steps_per_epoch
    num_epochs = math.ceil(max_train_steps / num_update_steps_per_epoch)
    # A prepared scheduler steps once per process at each optimizer step.
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    if ema_model is not None:
        ema_model.to(accelerator.device)
        accelerator.register_for_checkpointing(ema_model)

    if accelerator.is_main_process and args.logger != "none":
        accelerator.init_trackers("mic-diffrep-pretrain", config={
            k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()
        })

    # 3. Resume.
    global_step, first_epoch, resume_batches = resume_training_state(accelerator, args.output_dir,
                                                                     args.resume_from_checkpoint)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running pretraining *****")
    logger.info("  Num images = %d, resolution = %d, processes = %d", len(decoded), args.resolution,
                accelerator.num_processes)
    logger.info("  Total batch size = %d, optimization steps = %d, epochs = %d", total_batch_size, max_train_steps,
                num_epochs)

    def save_checkpoint(epoch: int, batches_done: int) -> None:
        save_training_state(accelerator, args.output_dir, global_step, epoch, batches_done,
                            args.checkpoints_total_limit)

    def build_pipeline():
        unet = accelerator.unwrap_model(model)
        if ema_model is not None:
            ema_model.store(unet.parameters())
            ema_model.copy_to(unet.parameters())
        pipeline = DiffusionFeaturePipeline(unet=unet, scheduler=noise_scheduler, resize_mode=args.resize_mode,
                                            intensity_window=args.intensity_window)
        return pipeline

    def restore_weights():
        if ema_model is not None:
            ema_model.restore(accelerator.unwrap_model(model).parameters())

    # Ctrl-C: finish the current step, save a checkpoint, exit.
    interrupted = {"flag": False}
    previous_handler = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        interrupted["flag"] = True
        logger.warning("Interrupted: saving a checkpoint after this step (press Ctrl-C again to abort).")
        signal.signal(signal.SIGINT, previous_handler)

    signal.signal(signal.SIGINT, on_sigint)

    progress_bar = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                        desc="Pretraining", unit="step")
    rank = accelerator.process_index
    start_time, train_seconds = time.time(), 0.0
    images_seen, stop_reason, last_loss = 0, None, float("nan")
    shard_indices: List[int] = []  # images this process trained on in its first epoch: shards must not overlap
    epoch = first_epoch
    try:
        for epoch in range(first_epoch, num_epochs):
            model.train()
            train_dataset.shuffle_for_epoch(epoch)
            skip = resume_batches if epoch == first_epoch else 0
            loader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
            epoch_start = time.time()
            for batch_index, batch in enumerate(loader, start=skip):
                clean_images = batch["pixel_values"]
                if epoch == first_epoch:
                    shard_indices.extend(batch["index"].tolist())
                if args.channels_last:
                    clean_images = clean_images.contiguous(memory_format=torch.channels_last)
                generator = torch.Generator().manual_seed(seed_for(args.seed, epoch, batch_index, rank))
                noise = torch.randn(clean_images.shape, generator=generator).to(clean_images.device)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],),
                                          generator=generator).to(clean_images.device)
                noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)

                with accelerator.accumulate(model):
                    model_output = model(noisy_images, timesteps).sample
                    if args.prediction_type == "epsilon":
                        target = noise
                    elif args.prediction_type == "sample":
                        target = clean_images
                    else:
                        target = noise_scheduler.get_velocity(clean_images, noise, timesteps)
                    loss = F.mse_loss(model_output.float(), target.float())
                    optimization_step(accelerator, model, loss, optimizer, lr_scheduler, args.max_grad_norm,
                                      f"epoch {epoch}, batch {batch_index} (step {global_step})")

                batch_images = accelerator.reduce(
                    torch.tensor(clean_images.shape[0], device=accelerator.device), reduction="sum").item()
                images_seen += batch_images
                if accelerator.sync_gradients:
                    if ema_model is not None:
                        ema_model.step(model.parameters())
                    global_step += 1
                    progress_bar.update(1)
                    last_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
                    logs = {"loss": last_loss, "lr": lr_scheduler.get_last_lr()[0], "step": global_step}
                    if ema_model is not None:
                        logs["ema_decay"] = ema_model.cur_decay_value
                    progress_bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{logs['lr']:.2e}")
                    accelerator.log(logs, step=global_step)

                    if global_step % args.checkpointing_steps == 0:
                        save_checkpoint(epoch, batch_index + 1)
                    stop_reason = stop_reason_for(accelerator, global_step, max_train_steps, start_time,
                                                  args.time_budget_minutes)
                    if interrupted["flag"]:
                        stop_reason = "interrupted"
                        save_checkpoint(epoch, batch_index + 1)
                    if stop_reason:
                        break
            train_seconds += time.time() - epoch_start
            accelerator.log({"epoch": epoch, "epoch_seconds": time.time() - epoch_start}, step=global_step)

            last_epoch = stop_reason is not None or epoch == num_epochs - 1
            if stop_reason == "interrupted":
                break
            if accelerator.is_main_process and args.save_images_epochs > 0 and (
                    (epoch + 1) % args.save_images_epochs == 0 or last_epoch):
                pipeline = build_pipeline()
                if args.sample_scheduler == "ddim":
                    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
                steps = args.ddpm_num_inference_steps or (50 if args.sample_scheduler == "ddim" else 1000)
                with accelerator.autocast():
                    images = pipeline(batch_size=args.eval_batch_size, num_inference_steps=steps, output_type="np",
                                      generator=torch.Generator(device="cpu").manual_seed(args.seed)).images
                restore_weights()
                os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
                grid_path = os.path.join(args.output_dir, "samples", f"epoch-{epoch + 1:04d}.png")
                save_image_grid(images, grid_path)
                logger.info("Saved samples to %s", grid_path)
                if args.logger == "tensorboard":
                    accelerator.get_tracker("tensorboard").writer.add_images(
                        "samples", images.transpose(0, 3, 1, 2), global_step)
            if accelerator.is_main_process and ((epoch + 1) % args.save_model_epochs == 0 or last_epoch):
                save_pipeline(build_pipeline(), args.output_dir)
                restore_weights()
            if stop_reason:
                break
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        progress_bar.close()

    accelerator.wait_for_everyone()
    from accelerate.utils import gather_object

    shards = gather_object([sorted(set(shard_indices))])
    summary = {
        "command": None,
        "train_data_dir": args.train_data_dir,
        "splits": splits,
        "num_images": len(decoded),
        "skipped_images": decoded.skipped,
        "resolution": args.resolution,
        "num_parameters": sum(p.numel() for p in accelerator.unwrap_model(model).parameters()),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "global_step": global_step,
        "epochs_completed": epoch + (0 if stop_reason == "interrupted" else 1),
        "stop_reason": stop_reason or "num_epochs",
        "final_loss": last_loss,
        "train_minutes": train_seconds / 60,
        "images_seen": images_seen,
        "first_epoch_images_per_process": [len(shard) for shard in shards],
        "first_epoch_images_on_several_processes": sum(len(shard) for shard in shards) - len(set().union(*shards)),
        "images_per_second": images_seen / train_seconds if train_seconds > 0 else None,
        "peak_memory_mb": peak_memory_mb(),
        "environment": environment_info(),
    }
    if accelerator.is_main_process:
        import sys

        summary["command"] = " ".join(sys.argv)
        with open(os.path.join(args.output_dir, SUMMARY_FILE), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        if args.push_to_hub and stop_reason != "interrupted":
            _push_to_hub(args)
    accelerator.end_training()
    return summary


@torch.no_grad()
def denoising_loss(unet, scheduler, clean_images: torch.Tensor, seed: int = 0) -> float:
    """Epsilon-prediction MSE of `unet` on `clean_images` (in [-1, 1]) with noise and timesteps fixed by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(clean_images.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean_images),), generator=generator)
    prediction = unet(scheduler.add_noise(clean_images, noise, timesteps), timesteps).sample
    return F.mse_loss(prediction.float(), noise).item()


def _push_to_hub(args) -> None:
    from huggingface_hub import create_repo, upload_folder

    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    repo_id = create_repo(repo_id, exist_ok=True, private=args.hub_private_repo, token=args.hub_token).repo_id
    upload_folder(
        repo_id=repo_id, folder_path=args.output_dir, token=args.hub_token, commit_message="MicDiffRep pretraining",
        ignore_patterns=["checkpoint-*", ".cache/*", ".tmp-*", "logs/*"],
    )
