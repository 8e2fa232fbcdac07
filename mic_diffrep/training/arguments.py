"""The settings of pretraining: every field is a `--field` flag of `training/pretrain.py`, `mic-diffrep pretrain`
and `training/pretrain_baseline.py` (through `transformers.HfArgumentParser`), and what the library functions take.

Flag names follow diffusers' `train_unconditional.py` where the meaning is the same.

```python
>>> from mic_diffrep.training import PretrainingArguments
>>> args = PretrainingArguments(train_data_dir="DATA_DIR", resolution=64, max_train_steps=100)
>>> args.learning_rate, args.timestep_power
(0.001, 3.0)

```
"""

import importlib.util
import json
import os
from dataclasses import dataclass, field, fields
from typing import List, Literal, Optional

import torch
from diffusers.optimization import SchedulerType

from ..data.medical import SLICE_FLAG_HELP, SliceSelection, slice_selection
from ..models.baselines import METHODS
from ..models.mic_diffrep.preprocessing import ImagePreprocessing
from ..models.mic_diffrep.unet import BETA_SCHEDULES, DEFAULT_UNET, create_unet
from ..utils import check_settings
from .checkpointing import check_checkpoint, find_checkpoint


# Settings a run resuming a checkpoint may change: where and how long it runs (a longer schedule continues the
# checkpoint's), where its data is (staged to another disk or machine), how it reads and logs, saves and samples. The
# others decide the model, the data, its order and the optimisation, which the checkpoint continues: a checkpoint
# records them and is refused by a run with others.
RESUMABLE_CHANGES = frozenset({
    "train_data_dir", "exclude_image_list", "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "cache_dir",
    "dataloader_num_workers", "skip_bad_images", "num_epochs", "max_train_steps", "time_budget_minutes",
    "mixed_precision", "channels_last", "checkpointing_steps", "checkpoints_total_limit", "logger", "logging_dir",
    "save_images_epochs", "save_model_epochs", "eval_batch_size", "sample_scheduler", "ddpm_num_inference_steps",
    "push_to_hub", "hub_model_id", "hub_token", "hub_private_repo"})


@dataclass(kw_only=True)
class CommonPretrainingArguments:
    """What the diffusion pretraining and the baselines' pretraining share: data, optimisation, checkpoints."""

    # Data
    train_data_dir: str = field(metadata={
        "help": "Folder of images: loose images, class sub-folders, or split folders such as Training/ and Testing/ "
                "(or train/, val/, test/) holding class sub-folders."})
    pretrain_splits: Optional[List[str]] = field(default=None, metadata={
        "help": "Splits to pretrain on (train, validation, test, or 'all'). Default: every split except test, so test "
                "images are never used unless asked for."})
    exclude_image_list: Optional[str] = field(default=None, metadata={
        "help": "A file of images to leave out of pretraining, one per line, relative to --train_data_dir or absolute "
                "(the test_images.txt a probe writes, say): test images carved from a folder without a test split. "
                "`mic-diffrep run` leaves out the test part its probe carves."})
    resolution: int = field(default=64, metadata={
        "help": "Image size (paper: 112; `mic-diffrep run --config paper` uses it). 64, the package's default and its "
                "benchmarks', has 3x fewer pixels per image to train on a CPU."})
    resize_mode: Literal["pad", "center_crop"] = field(default="pad", metadata={
        "help": "How non-square images become square: pad the short side with black (keeps the whole image) or crop "
                "the centre."})
    intensity_window: Literal["percentile", "none"] = field(default="percentile", metadata={
        "help": "Intensity rule: 'percentile' maps each image's 0.5-99.5th percentiles to 0..255 (the same for 8- and "
                "16-bit files); 'none' keeps 8-bit JPEG/PNG images as they are and min-max scales deeper ones and "
                "DICOM/NIfTI slices (physical values; a file's own display window wins in either case). Stored "
                "with the model and applied again at inference."})
    slice_axis: int = field(default=2, metadata={"help": SLICE_FLAG_HELP["slice_axis"]})
    slice_range: Optional[List[int]] = field(default=None, metadata={"help": SLICE_FLAG_HELP["slice_range"]})
    keep_empty_slices: bool = field(default=False, metadata={"help": SLICE_FLAG_HELP["keep_empty_slices"]})
    no_random_flip: bool = field(default=False, metadata={"help": "Disable random horizontal flips."})
    skip_bad_images: bool = field(default=False, metadata={
        "help": "Skip unreadable image files (listed in the log and the summary) instead of failing."})
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "Folder for decoded-image caches (safetensors). Default: OUTPUT_DIR/.cache."})
    dataloader_num_workers: int = field(default=0, metadata={
        "help": "Processes decoding images (once, before training) and loading batches."})
    # Training
    output_dir: str = field(default="runs/pretrain", metadata={
        "help": "Output folder: the pipeline (written at the end and every --save_model_epochs), checkpoints, "
                "sample grids and logs."})
    train_batch_size: int = field(default=32, metadata={
        "help": "Batch size per process (paper: 32). 64 gave -1.2 points of MSFA validation accuracy in the ablation "
                "at an equal 8-minute budget (0.918 vs 0.930: half the steps)."})
    num_epochs: int = field(default=200, metadata={"help": "Epochs (paper: 200)."})
    max_train_steps: Optional[int] = field(default=None, metadata={
        "help": "Total optimizer steps; overrides --num_epochs."})
    time_budget_minutes: Optional[float] = field(default=None, metadata={
        "help": "Stop (and save) after this many minutes of training; the learning-rate schedule is still laid out "
                "over --max_train_steps / --num_epochs."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches accumulated per optimizer step."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Initial learning rate (paper: 1e-4)."})
    lr_scheduler: str = field(default="linear", metadata={
        "help": "Schedule: linear (paper), cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup."})
    lr_warmup_steps: int = field(default=0, metadata={"help": "Warmup steps of the schedule."})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2."})
    adam_weight_decay: float = field(default=0.0, metadata={
        "help": "Decoupled weight decay (0: plain Adam, as in the paper). 0.05, the contrastive baselines' value, "
                "gave -0.9 points of MSFA validation accuracy in the ablation (0.922 vs 0.931 at the same steps)."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "Adam epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = field(default=None, metadata={
        "help": "'bf16' autocasts (about 2x faster on CPUs with AMX/AVX-512-BF16, and on recent GPUs); 'fp16' is "
                "GPU only. Default: the accelerate config."})
    channels_last: bool = field(default=False, metadata={"help": "Use the channels_last memory format."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, data order, noise and samples."})
    # Checkpoints and logging
    checkpointing_steps: int = field(default=500, metadata={
        "help": "Save a resumable checkpoint (accelerator.save_state) every this many steps, and at the last step."})
    checkpoints_total_limit: Optional[int] = field(default=None, metadata={"help": "Keep at most this many checkpoints."})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={
        "help": 'Resume from a checkpoint folder, the name of one in --output_dir (checkpoint-500), or "latest" for '
                'the newest one there.'})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start a new run in an --output_dir holding an earlier run's checkpoints or weights (refused without "
                "it, so a forgotten --resume_from_checkpoint loses nothing); the new run replaces or prunes them."})
    logger: Literal["tensorboard", "wandb", "none"] = field(default="tensorboard", metadata={
        "help": "Experiment tracker."})
    logging_dir: str = field(default="logs", metadata={"help": "Tracker folder, relative to --output_dir."})

    def __post_init__(self):
        check_settings(self)
        for name in ("train_batch_size", "num_epochs", "gradient_accumulation_steps", "checkpointing_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ValueError(f"`max_train_steps` must be at least 1, got {self.max_train_steps}.")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:  # 0 deleted every one
            raise ValueError(f"`checkpoints_total_limit` must be at least 1 (or unset: keep all), got "
                             f"{self.checkpoints_total_limit}.")
        if self.learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be positive, got {self.learning_rate}.")
        if self.lr_warmup_steps < 0:  # a negative warm-up started the schedule part-way up
            raise ValueError(f"`lr_warmup_steps` must be at least 0, got {self.lr_warmup_steps}.")
        schedules = [schedule.value for schedule in SchedulerType]
        if self.lr_scheduler not in schedules:
            raise ValueError(f"`lr_scheduler` must be one of {', '.join(schedules)}, got {self.lr_scheduler!r}.")
        if self.time_budget_minutes is not None and self.time_budget_minutes <= 0:
            raise ValueError(f"`time_budget_minutes` must be positive, got {self.time_budget_minutes}.")
        checkpoint = find_checkpoint(self.output_dir, self.resume_from_checkpoint)
        if self.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"`resume_from_checkpoint` {self.resume_from_checkpoint!r} is not a checkpoint "
                                    f"folder (give one, the name of one in --output_dir, or 'latest' for the newest "
                                    f"there).")
        if checkpoint is not None:  # readable and of these settings: checked before the data is decoded
            check_checkpoint(checkpoint, self.checkpoint_settings())
        if self.logger in ("tensorboard", "wandb") and importlib.util.find_spec(self.logger) is None:
            raise ValueError(f"`logger` {self.logger!r} is not installed: `pip install {self.logger}`, or --logger none.")
        ImagePreprocessing(self.resolution, self.resize_mode, self.intensity_window)  # checks them
        self.slices  # checks the slice flags

    def checkpoint_settings(self) -> dict:
        """The settings a checkpoint records and a run resuming it must share (JSON values; a UNet config file as an
        absolute path): all but those in `RESUMABLE_CHANGES`."""
        settings = {}
        for f in fields(self):
            if f.name in RESUMABLE_CHANGES:
                continue
            value = getattr(self, f.name)
            if f.name == "model_config_name_or_path" and os.path.exists(value):
                value = os.path.abspath(value)
            settings[f.name] = json.loads(json.dumps(value, default=str))
        return settings

    @property
    def preprocessing(self) -> ImagePreprocessing:
        return ImagePreprocessing(self.resolution, self.resize_mode, self.intensity_window)

    @property
    def slice_settings(self) -> dict:
        """The slice flags, as a pretrained folder records them (`model_index.json`, `baseline_config.json`)."""
        return {"slice_axis": self.slice_axis, "keep_empty_slices": self.keep_empty_slices,
                "slice_range": None if self.slice_range is None else list(self.slice_range)}

    @property
    def slices(self) -> SliceSelection:
        """Which slices of DICOM / NIfTI files are images (`--slice_axis`, `--slice_range`, `--keep_empty_slices`)."""
        return slice_selection(self.slice_axis, self.slice_range, self.keep_empty_slices)


@dataclass(kw_only=True)
class PretrainingArguments(CommonPretrainingArguments):
    """DDPM pretraining of a `UNet2DModel` (`training/pretrain.py`, `mic-diffrep pretrain`).

    The defaults are the recipe chosen on validation accuracy in `benchmarks/results/ablations.md`; the help of each
    recipe flag says what it did there. `mic-diffrep run --config paper` runs the paper's settings.
    """

    # Optimisation (the recipe's values; the paper's in brackets)
    learning_rate: float = field(default=1e-3, metadata={
        "help": "Initial learning rate (paper: 1e-4 with linear decay and no warm-up). In the ablation at an equal "
                "8-minute budget, 5e-4 with 100 warm-up steps and cosine decay gave +1.3 points of MSFA validation "
                "accuracy over the paper's schedule (0.890 vs 0.876), and 1e-3 with the small UNet +1.5 over 5e-4 "
                "(0.930 vs 0.915); 2e-3 gave -1.2 (0.918)."})
    lr_scheduler: str = field(default="cosine", metadata={
        "help": "Schedule: cosine (default), linear (paper), cosine_with_restarts, polynomial, constant, "
                "constant_with_warmup."})
    lr_warmup_steps: int = field(default=100, metadata={"help": "Warm-up steps of the schedule (paper: 0)."})

    # Model and noise schedule
    model_config_name_or_path: str = field(default=DEFAULT_UNET, metadata={
        "help": "UNet config: a preset ('small' = 1.1M parameters, 'base' = 4.3M (the paper preset's), 'mini' = 0.27M, "
                "'tiny' for tests), a config.json, or a folder holding one. 'small' gave +1.5 points of MSFA "
                "validation accuracy over 'base' in the ablation at an equal 8-minute budget (0.915 vs 0.900 at lr "
                "5e-4: 2.2x the steps); 'mini' gave -2.3 under 'small' (0.907 vs 0.930 at lr 1e-3: 1.6x the steps)."})
    unet_dropout: float = field(default=0.0, metadata={
        "help": "Dropout probability in the UNet's ResNet blocks (UNet2DModel's `dropout`; Ho et al. 2020 used 0.1 "
                "on CIFAR-10). Default: 0 (paper: not stated; diffusers' default): 0.1 gave -1.5 points of MSFA "
                "validation accuracy in the ablation (0.916 vs 0.931 at an equal 8-minute budget; about 1.2x the "
                "time per step here)."})
    ddpm_num_steps: int = field(default=1000, metadata={"help": "Diffusion steps of the noise schedule."})
    ddpm_beta_schedule: str = field(default="linear", metadata={
        "help": f"Beta schedule of the noise: {', '.join(BETA_SCHEDULES)} (paper and default: linear). "
                "squaredcos_cap_v2 (cosine) keeps far less noise at the read-out timesteps (alpha_bar 0.85 against "
                "0.52 at t = 250) and gave -0.7 points of MSFA validation accuracy in the ablation (0.924 vs 0.931 at "
                "the same steps)."})
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = field(default="epsilon", metadata={
        "help": "What the UNet predicts (paper: epsilon, the noise). 'sample' (x0) gave -2.6 points of MSFA "
                "validation accuracy in the ablation, 'v_prediction' -5.7 (0.873 vs 0.930 with the small UNet)."})
    # What the features are read from (the representation recipe)
    max_train_timestep: Optional[int] = field(default=None, metadata={
        "help": "Train on timesteps below this only (default: all of the schedule, as in the paper). Features are "
                "read at low noise levels, so training can spend its capacity there: 300 gave +0.7 points of MSFA "
                "validation accuracy in the ablation, less than --timestep_power 2 (+1.1)."})
    timestep_power: float = field(default=3.0, metadata={
        "help": "Timesteps are drawn as floor(T * u ** power), u uniform in [0, 1): 1 is uniform (paper); > 1 "
                "favours the low noise levels features are read at. 2 gave +1.1 points of MSFA validation accuracy "
                "over uniform in the ablation (0.900 vs 0.890), more than --max_train_timestep 300 (0.897); 3 "
                "(default) tied 2 with the small UNet (mean of two seeds 0.925 vs 0.925, +0.03 points: chosen by "
                "the ablation's rule, within noise)."})
    snr_gamma: Optional[float] = field(default=None, metadata={
        "help": "Min-SNR-gamma loss weighting (Hang et al., 2023; diffusers' --snr_gamma): each timestep's loss is "
                "weighted by min(SNR, gamma) / SNR (epsilon prediction), which down-weights the low noise levels. "
                "Default: none (unweighted, as in the paper): 5 gave -2.9 points of MSFA validation accuracy in the "
                "ablation (0.902 vs 0.931 at the same steps), as it all but switches off the low noise levels that "
                "--timestep_power 3 trains on and features are read at (weight 0.011 at t = 10)."})
    signal_weighting: bool = field(default=False, metadata={
        "help": "Weight each image's loss by the share of signal in its noisy input, alpha_bar_t (1 at t = 0, 0.52 at "
                "t = 250, 0.08 at t = 500 on the linear schedule): the loss leans further towards the clean steps "
                "features are read at (Chen et al. 2024 weight the loss towards clean data), the opposite of "
                "--snr_gamma. Off by default (paper): -1.5 points of MSFA validation accuracy in the ablation (0.916 "
                "vs 0.931 at the same steps); on top of --timestep_power 3 it mostly switches off the few high noise "
                "levels left."})
    self_conditioning: bool = field(default=False, metadata={
        "help": "Self-conditioning (Chen et al. 2023, 'Analog Bits'; DDAE++): the UNet also sees its own estimate of "
                "the clean image (from a first forward without it, on half the batches), and features are read from "
                "the forward that sees it. About 1.15x the compute of a training step and 2x that of a read-out. Off "
                "by default (paper): -2.0 points of MSFA validation accuracy in the ablation (0.911 vs 0.931 at an "
                "equal 8-minute budget)."})
    mirror_symmetric_kernels: bool = field(default=False, metadata={
        "help": "Keep every convolution kernel its own left-right mirror image (at initialisation and after every "
                "optimizer step), so the pooled features of an image and of its mirror image nearly agree: MRI from "
                "different sources can be mirrored (radiological / neurological convention) and the benchmark's "
                "cross-source near-duplicates mostly are (benchmarks/results/mirror_invariance.md). Off by default "
                "(paper): -2.1 points of MSFA validation accuracy in the ablation (0.910 vs 0.931 at the same "
                "steps)."})
    random_crop_scale: Optional[float] = field(default=None, metadata={
        "help": "Random resized crops covering at least this share of the image (e.g. 0.6), as the contrastive "
                "baselines use; default: none (paper). With --intensity_jitter, 0.6 cost 0.7 points of MSFA validation "
                "accuracy in the ablation (0.883 vs 0.890); alone, with the small UNet, 1.2 points (0.919 vs 0.931 "
                "at the same steps)."})
    intensity_jitter: bool = field(default=False, metadata={
        "help": "Random brightness, contrast and gamma changes of each training image (as the contrastive baselines "
                "use); off by default: alone it gave -1.0 points of MSFA validation accuracy with the small UNet "
                "(0.920 vs 0.930; with crops see --random_crop_scale)."})
    use_ema: bool = field(default=False, metadata={
        "help": "Keep an exponential moving average of the weights; the saved UNet holds the EMA weights. Off by "
                "default: over an 8-minute run the EMA weights' features scored below the raw weights' in the "
                "ablation, by 0.4 points with the base UNet (0.886 vs 0.890, about 800 steps) and 0.3 with the small "
                "one (0.927 vs 0.930, about 2,000 steps)."})
    ema_inv_gamma: float = field(default=1.0, metadata={"help": "EMA warmup inverse multiplicative factor."})
    ema_power: float = field(default=3 / 4, metadata={"help": "EMA warmup power."})
    ema_max_decay: float = field(default=0.9999, metadata={"help": "Maximum EMA decay."})
    # Samples, saving, Hub
    save_images_epochs: int = field(default=10, metadata={
        "help": "Write a PNG grid of generated samples every this many epochs and at the end; 0 turns sample grids "
                "off."})
    save_model_epochs: int = field(default=10, metadata={"help": "Save the pipeline every this many epochs."})
    eval_batch_size: int = field(default=16, metadata={"help": "Number of samples in each grid."})
    sample_scheduler: Literal["ddim", "ddpm"] = field(default="ddim", metadata={
        "help": "Sampler of the grids: 'ddim' (cheap: 50 steps of 16 images take a few seconds on 2 CPU cores at "
                "64 px) or 'ddpm' (the paper's 1000-step sampler, 20x slower)."})
    ddpm_num_inference_steps: Optional[int] = field(default=None, metadata={
        "help": "Denoising steps of the grids (default: 50 for ddim, 1000 for ddpm)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the pipeline folder to the Hub at the end."})
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "Hub repository (default: output folder name)."})
    hub_token: Optional[str] = field(default=None, metadata={"help": "Hub token (default: the stored login)."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("save_model_epochs", "eval_batch_size", "ddpm_num_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.save_images_epochs < 0:
            raise ValueError(f"`save_images_epochs` must be >= 0 (0: no sample grids), got {self.save_images_epochs}.")
        if self.ddpm_num_inference_steps is not None and self.ddpm_num_inference_steps < 1:
            raise ValueError(f"`ddpm_num_inference_steps` must be at least 1, got {self.ddpm_num_inference_steps}.")
        if self.max_train_timestep is not None and not 0 < self.max_train_timestep <= self.ddpm_num_steps:
            raise ValueError(f"`max_train_timestep` must be in [1, {self.ddpm_num_steps}], got {self.max_train_timestep}.")
        if self.ddpm_beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"`ddpm_beta_schedule` must be one of {', '.join(BETA_SCHEDULES)}, got "
                             f"{self.ddpm_beta_schedule!r}.")
        if self.timestep_power <= 0:
            raise ValueError(f"`timestep_power` must be positive, got {self.timestep_power}.")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"`snr_gamma` must be positive, got {self.snr_gamma}.")
        if not 0 <= self.unet_dropout < 1:
            raise ValueError(f"`unet_dropout` must be in [0, 1), got {self.unet_dropout}.")
        if self.random_crop_scale is not None and not 0 < self.random_crop_scale <= 1:
            raise ValueError(f"`random_crop_scale` must be in (0, 1], got {self.random_crop_scale}.")
        with torch.device("meta"):  # the config and the resolution it divides, before any image is decoded
            create_unet(self.resolution, self.model_config_name_or_path, self.self_conditioning, self.unet_dropout)


# Optimiser settings of each baseline unless given: AdamW 1e-3 without warm-up for the contrastive ones; MAE's own
# (He et al. 2022: beta2 0.95, warm-up, base lr 1.5e-4), which scored 13 points more validation accuracy than those
# in `benchmarks/baseline_recipes.py`.
_CONTRASTIVE_OPTIMISER = {"learning_rate": 1e-3, "lr_warmup_steps": 0, "adam_beta2": 0.999}
BASELINE_OPTIMISER_DEFAULTS = {
    "mocov2": _CONTRASTIVE_OPTIMISER,
    "byol": _CONTRASTIVE_OPTIMISER,
    "mae": {"learning_rate": 1.5e-4, "lr_warmup_steps": 200, "adam_beta2": 0.95},
}


def _per_method(name: str) -> str:
    return "Default: " + ", ".join(f"{method} {defaults[name]:g}" for method, defaults in
                                   BASELINE_OPTIMISER_DEFAULTS.items()) + "."


@dataclass(kw_only=True)
class BaselinePretrainingArguments(CommonPretrainingArguments):
    """Pretraining of an MAE, MoCo v2 or BYOL baseline (`training/pretrain_baseline.py`), with the defaults that
    suit them: 64 px, batch 64, AdamW with weight decay 0.05 and cosine decay; learning rate, warm-up and beta2 per
    method (`BASELINE_OPTIMISER_DEFAULTS`).

    ```python
    >>> args = BaselinePretrainingArguments(method="mae", train_data_dir="data")
    >>> args.learning_rate, args.adam_beta2
    (0.00015, 0.95)

    ```
    """

    method: Literal["mocov2", "byol", "mae"] = field(metadata={"help": "Which baseline to pretrain."})
    resolution: int = field(default=64, metadata={"help": "Image size."})
    output_dir: str = field(default="runs/baseline", metadata={"help": "Output folder (weights and config)."})
    train_batch_size: int = field(default=64, metadata={"help": "Batch size per process."})
    learning_rate: Optional[float] = field(default=None, metadata={
        "help": "Initial learning rate. " + _per_method("learning_rate")})
    lr_scheduler: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    lr_warmup_steps: Optional[int] = field(default=None, metadata={
        "help": "Warm-up steps of the schedule. " + _per_method("lr_warmup_steps")})
    adam_beta2: Optional[float] = field(default=None, metadata={"help": "Adam beta2. " + _per_method("adam_beta2")})
    adam_weight_decay: float = field(default=0.05, metadata={"help": "Decoupled weight decay."})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {self.method!r}.")
        for name, value in BASELINE_OPTIMISER_DEFAULTS[self.method].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        super().__post_init__()


# The fields that make up the pretraining recipe (what the ablation study chose; `--config paper` resets them).
RECIPE_KEYS = ("learning_rate", "lr_scheduler", "lr_warmup_steps", "unet_dropout", "ddpm_beta_schedule",
               "max_train_timestep", "timestep_power", "snr_gamma", "signal_weighting", "self_conditioning",
               "mirror_symmetric_kernels", "random_crop_scale", "intensity_jitter", "use_ema")


def default_recipe() -> dict:
    """The recipe `PretrainingArguments` trains with when given no recipe flags.

    ```python
    >>> default_recipe()["timestep_power"]
    3.0

    ```
    """
    return {f.name: f.default for f in fields(PretrainingArguments) if f.name in RECIPE_KEYS}

