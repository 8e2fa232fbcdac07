"""DDPM pretraining of a `UNet2DModel` on unlabelled medical images, with `accelerate`.

Run it as `accelerate launch training/pretrain.py --train_data_dir DIR --output_dir OUT` (or `mic-diffrep pretrain`),
or from Python with `pretrain(PretrainingArguments(...))`. The output folder is a diffusers pipeline folder
(`model_index.json`, `unet/`, `scheduler/`, safetensors) that `DiffusionFeaturePipeline.from_pretrained(OUT)` loads.

```python
>>> from mic_diffrep.training import PretrainingArguments, pretrain
>>> summary = pretrain(PretrainingArguments(train_data_dir="DATA_DIR", resolution=64, max_train_steps=100))  # doctest: +SKIP

```
"""

import logging
import os
import shutil
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object, set_seed
from diffusers import DDIMScheduler
from diffusers.training_utils import EMAModel, compute_snr
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file

from ..data.augmentations import PretrainingAugment
from ..models.mic_diffrep.unet import create_scheduler, create_unet, mirror_symmetrize
from ..models.mic_diffrep.unet_features import is_self_conditioned, predicted_clean
from ..pipelines import DiffusionFeaturePipeline, save_image_grid
from ..reporting.hub import create_hub_repo, default_repo_id, push_pipeline_to_hub
from ..reporting.model_card import write_pipeline_card
from ..utils import (SUMMARY_FILE, check_card_replaceable, command_line, environment_info, output_folder,
                     peak_memory_mb, tracker_config, write_json)
from .arguments import RECIPE_KEYS, PretrainingArguments
from .checkpointing import check_new_run, find_checkpoint, save_pipeline
from .loop import (TrainingState, end_trackers, load_training_images, make_accelerator, make_dataloader,
                   plan_schedule, summary_stop_reason, train)


logger = logging.getLogger(__name__)


def sample_timesteps(batch_size: int, num_train_timesteps: int, generator: torch.Generator,
                     max_train_timestep: Optional[int] = None, power: float = 1.0) -> torch.Tensor:
    """Training timesteps: uniform over `[0, max_train_timestep)` (default the whole schedule, as in the paper), or
    `floor(max * u ** power)` with u uniform, which puts more of them at low noise for `power > 1`."""
    high = max_train_timestep or num_train_timesteps
    if power == 1.0:
        return torch.randint(0, high, (batch_size,), generator=generator)
    u = torch.rand(batch_size, generator=generator)
    return (high * u.pow(power)).long().clamp_(0, high - 1)


def diffusion_loss(model, noise_scheduler, clean_images: torch.Tensor, generator: torch.Generator,
                   args: PretrainingArguments, augment: PretrainingAugment) -> torch.Tensor:
    """The denoising loss of one batch: noise and timesteps drawn from `generator`, MSE on the prediction target."""
    if augment.enabled:
        clean_images = augment(clean_images, generator)
    if args.channels_last:
        clean_images = clean_images.contiguous(memory_format=torch.channels_last)
    noise = torch.randn(clean_images.shape, generator=generator).to(clean_images.device)
    timesteps = sample_timesteps(len(clean_images), noise_scheduler.config.num_train_timesteps, generator,
                                 args.max_train_timestep, args.timestep_power).to(clean_images.device)
    noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
    if args.self_conditioning:
        noisy_images = self_conditioning_input(model, noise_scheduler, noisy_images, timesteps, generator,
                                               args.prediction_type)
    prediction = model(noisy_images, timesteps).sample
    if args.prediction_type == "epsilon":
        target = noise
    elif args.prediction_type == "sample":
        target = clean_images
    else:
        target = noise_scheduler.get_velocity(clean_images, noise, timesteps)
    weights = loss_weights(noise_scheduler, timesteps, args)
    if weights is None:
        return F.mse_loss(prediction.float(), target.float())
    per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_image * weights).mean()


def signal_share(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t of each of `timesteps`: the share of signal (variance) in a noisy image at that step."""
    return noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps]


def loss_weights(noise_scheduler, timesteps: torch.Tensor, args: PretrainingArguments) -> Optional[torch.Tensor]:
    """Per-image loss weights of the recipe (`--snr_gamma`, `--signal_weighting`, multiplied), or None: unweighted."""
    weights = None
    if args.snr_gamma is not None:
        weights = min_snr_weights(noise_scheduler, timesteps, args.snr_gamma, args.prediction_type)
    if args.signal_weighting:
        signal = signal_share(noise_scheduler, timesteps).float()
        weights = signal if weights is None else weights * signal
    return weights


def self_conditioning_input(model, noise_scheduler, noisy_images: torch.Tensor, timesteps: torch.Tensor,
                            generator: torch.Generator, prediction_type: str) -> torch.Tensor:
    """The noisy images beside the clean-image estimate a self-conditioned UNet learns to use: on half the batches
    (a coin drawn from `generator`) its own estimate from a first forward without one, with no gradient; zeros on the
    others, which is what it sees first when sampling or reading features (Chen et al. 2023)."""
    estimate = torch.zeros_like(noisy_images)
    if torch.rand((), generator=generator) < 0.5:
        with torch.no_grad():
            first = model(torch.cat([noisy_images, estimate], dim=1), timesteps).sample
        alpha_bar = signal_share(noise_scheduler, timesteps).view(-1, 1, 1, 1)
        estimate = predicted_clean(first, noisy_images, alpha_bar, prediction_type).to(noisy_images.dtype)
    return torch.cat([noisy_images, estimate], dim=1)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023) of `timesteps`, for the loss of `prediction_type`: the weight of
    the x0 loss is min(SNR, gamma), divided by SNR for epsilon prediction and by SNR + 1 for v-prediction.

    ```python
    >>> from mic_diffrep.models.mic_diffrep.unet import create_scheduler
    >>> weights = min_snr_weights(create_scheduler(), torch.tensor([10, 500, 999]), 5.0, "epsilon")
    >>> [round(w, 3) for w in weights.tolist()]
    [0.011, 1.0, 1.0]

    ```
    """
    snr = compute_snr(noise_scheduler, timesteps)
    weights = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return weights / snr
    if prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights


def save_sample_grid(pipeline: DiffusionFeaturePipeline, args: PretrainingArguments, accelerator,
                     state: TrainingState) -> str:
    """Generates `eval_batch_size` images (DDIM-50 by default) and saves them as `samples/epoch-NNNN.png`."""
    if args.sample_scheduler == "ddim":
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    steps = args.ddpm_num_inference_steps or (50 if args.sample_scheduler == "ddim" else 1000)
    with accelerator.autocast():  # the pipeline samples in eval mode (no --unet_dropout), as the saved one does
        images = pipeline(batch_size=args.eval_batch_size, num_inference_steps=steps, output_type="np",
                          generator=torch.Generator(device="cpu").manual_seed(args.seed)).images
    os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
    grid_path = os.path.join(args.output_dir, "samples", f"epoch-{state.epoch + 1:04d}.png")
    save_image_grid(images, grid_path)
    logger.info("Saved samples to %s", grid_path)
    if args.logger == "tensorboard":
        accelerator.get_tracker("tensorboard").writer.add_images("samples", images.transpose(0, 3, 1, 2),
                                                                 state.global_step)
    return grid_path


EMA_FOLDER = "unet_ema"


# The pickle of the EMA weights in checkpoints written before they were a safetensors folder.
LEGACY_EMA_FILE = "custom_checkpoint_0.pkl"


def register_ema_for_checkpointing(accelerator, ema_model: EMAModel, checkpoint: Optional[str] = None) -> None:
    """Checkpoints hold the EMA weights as a diffusers model folder (`unet_ema/`, safetensors, its decay state in the
    config), as diffusers' training scripts save them: `register_for_checkpointing` pickles them, and accelerate
    unpickles the file with `weights_only=False` when it resumes. A `checkpoint` to resume that holds that pickle
    (written before) is resumed as it was written, once the pickle has been read with `weights_only=True`: a file
    carrying code fails there, before accelerate reads it."""

    def save(models, weights, output_dir):
        if accelerator.is_main_process:
            ema_model.save_pretrained(os.path.join(output_dir, EMA_FOLDER))

    def load(models, input_dir):
        folder, legacy = os.path.join(input_dir, EMA_FOLDER), os.path.join(input_dir, LEGACY_EMA_FILE)
        if os.path.isfile(legacy):
            ema_model.load_state_dict(torch.load(legacy, map_location="cpu", weights_only=True))
        elif os.path.isdir(folder):  # what `EMAModel.from_pretrained` reads, into this run's EMA
            config = ema_model.model_cls.load_config(folder)
            state = {key: config[key] for key in ema_model.state_dict() if key != "shadow_params"}
            weights = ema_model.model_cls.from_config(ema_model.model_config)
            weights.load_state_dict(load_file(os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)))
            ema_model.load_state_dict({**state, "shadow_params": [p.detach() for p in weights.parameters()]})
        ema_model.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)
    if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, LEGACY_EMA_FILE)):
        accelerator.register_for_checkpointing(ema_model)  # accelerate counts the pickles against its objects


def pretrain(args: PretrainingArguments) -> dict:
    """Pretrains and writes the pipeline folder; returns the summary also written to `pretraining_summary.json`."""
    with output_folder(args.output_dir, kind="pipeline", data_folders=(args.train_data_dir,)):
        check_new_run(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
        check_card_replaceable(args.output_dir)  # its pipeline card would replace a README.md of the user's own
        return _pretrain(args)


def _pretrain(args: PretrainingArguments) -> dict:
    accelerator = make_accelerator(args, log_with=None if args.logger == "none" else args.logger)
    set_seed(args.seed)
    hub_repo_id = default_repo_id(args.output_dir, args.hub_model_id)
    if args.push_to_hub and accelerator.is_main_process:
        hub_repo_id = create_hub_repo(hub_repo_id, args.hub_token, args.hub_private_repo)  # fails before training

    samples = os.path.join(args.output_dir, "samples")
    if find_checkpoint(args.output_dir, args.resume_from_checkpoint) is None and os.path.isdir(samples) \
            and accelerator.is_main_process:  # a new run (--overwrite_output_dir): not the earlier run's grids
        logger.warning("Removing the earlier run's sample grids from %s.", samples)
        shutil.rmtree(samples)

    # 1. Data: decoded once.
    decoded, splits = load_training_images(args, accelerator)
    logger.info(accelerator.state)  # after the checks of the input: a mistake is one line
    logger.info("Pretraining on %d images of split(s) %s of %s", len(decoded), splits, args.train_data_dir)
    dataset, loader = make_dataloader(decoded, args)

    # 2. Model, noise schedule, optimizer, schedule.
    model = create_unet(args.resolution, args.model_config_name_or_path, args.self_conditioning, args.unet_dropout)
    if args.mirror_symmetric_kernels:
        mirror_symmetrize(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    noise_scheduler = create_scheduler(args.ddpm_num_steps, args.ddpm_beta_schedule, args.prediction_type)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True,
                             inv_gamma=args.ema_inv_gamma, power=args.ema_power, model_cls=type(model),
                             model_config=model.config)
    max_train_steps, num_epochs, lr_scheduler = plan_schedule(args, loader, optimizer, accelerator)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    if ema_model is not None:
        ema_model.to(accelerator.device)
        register_ema_for_checkpointing(accelerator, ema_model,
                                       find_checkpoint(args.output_dir, args.resume_from_checkpoint))
    if accelerator.is_main_process and args.logger != "none":
        accelerator.init_trackers("mic-diffrep-pretrain", config=tracker_config(args))
    logger.info("***** Running pretraining *****")
    logger.info("  Num images = %d, resolution = %d, processes = %d", len(decoded), args.resolution,
                accelerator.num_processes)
    logger.info("  Total batch size = %d, optimization steps = %d, epochs = %d",
                args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
                max_train_steps, num_epochs)

    # 3. Train; the pipeline (EMA weights with --use_ema) is sampled and saved at the end of some epochs.
    def build_pipeline() -> DiffusionFeaturePipeline:
        unet = accelerator.unwrap_model(model)
        if ema_model is not None:
            ema_model.store(unet.parameters())
            ema_model.copy_to(unet.parameters())
        return DiffusionFeaturePipeline(unet=unet, scheduler=noise_scheduler, resize_mode=args.resize_mode,
                                        intensity_window=args.intensity_window, **args.slice_settings)

    def restore_weights() -> None:
        if ema_model is not None:
            ema_model.restore(accelerator.unwrap_model(model).parameters())

    def after_step(state: TrainingState) -> Optional[dict]:
        if args.mirror_symmetric_kernels:
            mirror_symmetrize(model)
        if ema_model is not None:
            ema_model.step(model.parameters())
            return {"ema_decay": ema_model.cur_decay_value}
        return None

    weights_step = None  # the step of the weights this run saved into the folder last

    def end_of_epoch(state: TrainingState, last_epoch: bool) -> None:
        nonlocal weights_step
        if not accelerator.is_main_process:
            return
        if args.save_images_epochs > 0 and ((state.epoch + 1) % args.save_images_epochs == 0 or last_epoch):
            save_sample_grid(build_pipeline(), args, accelerator, state)
            restore_weights()
        if (state.epoch + 1) % args.save_model_epochs == 0 or last_epoch:
            save_pipeline(build_pipeline(), args.output_dir)
            restore_weights()
            weights_step = state.global_step

    augment = PretrainingAugment(args.random_crop_scale, args.intensity_jitter)
    state = train(accelerator, model, loader, dataset, optimizer, lr_scheduler, args, max_train_steps, num_epochs,
                  lambda unet, pixels, generator: diffusion_loss(unet, noise_scheduler, pixels, generator, args,
                                                                 augment),
                  after_step, end_of_epoch)

    # 4. Summary.
    summary = training_summary(state, args, accelerator, decoded, splits, model)
    summary["weights_step"] = weights_step
    if accelerator.is_main_process:
        write_json(os.path.join(args.output_dir, SUMMARY_FILE), summary)
        push = args.push_to_hub and state.stop_reason != "interrupted"
        if weights_step is not None:  # not for weights this run did not save (or a folder of checkpoints only)
            write_pipeline_card(args.output_dir, summary, hub_repo_id if push else None)
        if push:
            push_pipeline_to_hub(args.output_dir, hub_repo_id, token=args.hub_token, create_repo=False,
                                 logging_dir=args.logging_dir)
    end_trackers(accelerator)
    return summary


def training_summary(state: TrainingState, args, accelerator, decoded, splits, model) -> dict:
    """What a run did (images/s, steps, stop reason, versions, command), as written to `pretraining_summary.json`."""
    shards = gather_object([sorted(set(state.first_epoch_indices))])
    return {
        "command": command_line(),
        "train_data_dir": args.train_data_dir,
        "splits": splits,
        "exclude_image_list": args.exclude_image_list,  # images left out (a carved test split)
        "num_images": len(decoded),
        "data_fingerprint": decoded.fingerprint,  # the images' files and preprocessing (`images_fingerprint`)
        "skipped_images": decoded.skipped,
        "resolution": args.resolution,
        "recipe": {key: getattr(args, key) for key in RECIPE_KEYS},
        "settings": args.checkpoint_settings(),  # what decides the weights (with the data and the length)
        "num_epochs": args.num_epochs,
        "max_train_steps": args.max_train_steps,
        "num_parameters": sum(p.numel() for p in accelerator.unwrap_model(model).parameters()),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "global_step": state.global_step,
        "epochs_completed": state.epochs_completed,
        "stop_reason": summary_stop_reason(state, args),
        "final_loss": state.last_loss,
        "train_minutes": state.train_seconds / 60,
        "images_seen": state.images_seen,
        "first_epoch_images_per_process": [len(shard) for shard in shards],
        "first_epoch_images_on_several_processes": sum(len(s) for s in shards) - len(set().union(*shards)),
        "images_per_second": state.images_seen / state.train_seconds if state.train_seconds > 0 else None,
        "peak_memory_mb": peak_memory_mb(),
        "environment": environment_info(),
    }


@torch.no_grad()
def denoising_loss(unet, scheduler, clean_images: torch.Tensor, seed: int = 0) -> float:
    """Epsilon-prediction MSE of `unet` on `clean_images` (in [-1, 1]) with noise and timesteps fixed by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(clean_images.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean_images),), generator=generator)
    noisy_images = scheduler.add_noise(clean_images, noise, timesteps)
    if is_self_conditioned(unet):  # scored as it is first used: without an estimate of its own
        noisy_images = torch.cat([noisy_images, torch.zeros_like(noisy_images)], dim=1)
    prediction = unet(noisy_images, timesteps).sample
    return F.mse_loss(prediction.float(), noise).item()
