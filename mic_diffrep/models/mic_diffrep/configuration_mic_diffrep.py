"""MicDiffRep model configuration."""

from typing import List, Optional, Sequence

from transformers import PretrainedConfig

from .preprocessing import INTENSITY_WINDOWS, RESIZE_MODES, ImagePreprocessing, check_choice
from .unet import DEFAULT_UNET, UNET_PRESETS
from .unet_features import DEFAULT_POOLING, DEFAULT_TIMESTEPS, POOLING_CHOICES, block_names_from_config, check_layers


PROBLEM_TYPES = (None, "single_label_classification", "multi_label_classification", "regression")


# The noise schedules diffusers' `DDPMScheduler` implements.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


class MicDiffRepConfig(PretrainedConfig):
    r"""
    Configuration of a [`MicDiffRepForImageClassification`]: a frozen DDPM-pretrained UNet, the noise schedule, which
    blocks and timesteps its features come from, how they are pooled, and the MSFA head on top.

    Args:
        unet_config (`dict`, *optional*):
            the `UNet2DModel` config (as in a pipeline's `unet/config.json`). Defaults to the default preset
            (`"small"`, 1.1M parameters) at 112 px.
        num_train_timesteps (`int`, *optional*, defaults to 1000): length of the DDPM noise schedule.
        beta_schedule (`str`, *optional*, defaults to `"linear"`), beta_start, beta_end (`float`): the schedule's betas.
        prediction_type (`str`, *optional*, defaults to `"epsilon"`): what the UNet predicts (`"epsilon"`,
            `"sample"`, `"v_prediction"`); read only by a self-conditioned UNet, which first estimates the clean image.
        layers (`List[str]`, *optional*): UNet blocks whose features are used (`"down_blocks.1"`, `"mid_block"`, ...);
            defaults to all blocks.
        timesteps (`List[int]`, *optional*, defaults to `[10, 25, 50, 100, 250]`): noise levels at which features
            are taken.
        pooling (`str`, *optional*, defaults to `"avgmax"`): `"avg"`, `"avgmax"` or `"grid"`.
        pooling_grid_size (`int`, *optional*, defaults to 2): grid size for `pooling="grid"`.
        num_noise_samples (`int`, *optional*, defaults to 1): noise draws averaged per image.
        flip_average (`bool`, *optional*, defaults to `False`): average the features of each image and of its
            left-right mirror image (test-time flip averaging).
        noise_seed (`int`, *optional*, defaults to 0): seed of the fixed noise, which makes inference deterministic.
        hidden_size (`int`, *optional*, defaults to 512): MSFA aggregation width (eq. 5); `0` makes a single linear
            layer (a single-layer probe).
        classifier_dropout (`float`, *optional*, defaults to 0.0): dropout on the aggregated features.
        mixed_precision (`str`, *optional*, defaults to `"no"`): the precision the UNet ran in when the head was
            trained (`"no"`, `"fp16"`, `"bf16"`); `mic_diffrep.inference.load_classifier` (`evaluate`, `predict`,
            the demo) runs the UNet in it unless told otherwise, so that predictions are the probe's.
        resize_mode (`str`, *optional*, defaults to `"pad"`): how images are made square, as in pretraining.
        problem_type (`str`, *optional*): `"single_label_classification"` (cross-entropy, paper eq. 3),
            `"multi_label_classification"` (BCE with logits) or `"regression"` (MSE); inferred from the labels when
            unset, as in transformers' other image classifiers.
        intensity_window (`str`, *optional*, defaults to `"percentile"`): the intensity rule of pretraining
            (`"percentile"` or `"none"`, see `mic_diffrep.models.mic_diffrep.preprocessing`).

    Example:

    ```python
    >>> from mic_diffrep import MicDiffRepConfig
    >>> config = MicDiffRepConfig(timesteps=[10, 100], layers=["mid_block", "up_blocks.1"], num_labels=4)
    >>> config.resolution
    112

    ```
    """

    model_type = "mic_diffrep"

    def __init__(
        self,
        unet_config: Optional[dict] = None,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        prediction_type: str = "epsilon",
        layers: Optional[Sequence[str]] = None,
        timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
        pooling: str = DEFAULT_POOLING,
        pooling_grid_size: int = 2,
        num_noise_samples: int = 1,
        flip_average: bool = False,
        noise_seed: int = 0,
        hidden_size: int = 512,
        classifier_dropout: float = 0.0,
        mixed_precision: str = "no",
        resize_mode: str = "pad",
        intensity_window: str = "percentile",
        **kwargs,
    ):
        if "_class_name" in kwargs:  # diffusers' config of a pretrained pipeline's `unet/` folder
            raise ValueError(f"This is the config of a diffusers {kwargs['_class_name']} (the `unet/` folder of a "
                             f"pretrained pipeline), not of a MicDiffRep classifier: load the pipeline folder with "
                             f"`DiffusionFeaturePipeline.from_pretrained`, or make a classifier from it with "
                             f"`mic-diffrep probe --pretrained PIPELINE_FOLDER`.")
        if unet_config is None:
            unet_config = dict(UNET_PRESETS[DEFAULT_UNET], sample_size=112)
        self.unet_config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unet_config).items()
                            if not k.startswith("_")}
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.prediction_type = prediction_type
        valid_layers = block_names_from_config(self.unet_config)
        layers = [layers] if isinstance(layers, str) else layers  # one block, by name
        self.layers: List[str] = list(layers) if layers is not None else valid_layers
        self.timesteps: List[int] = [int(t) for t in ([timesteps] if isinstance(timesteps, int) else timesteps)]
        self.pooling = pooling
        self.pooling_grid_size = pooling_grid_size
        self.num_noise_samples = num_noise_samples
        self.flip_average = bool(flip_average)
        self.noise_seed = noise_seed
        self.hidden_size = hidden_size
        self.classifier_dropout = classifier_dropout
        self.mixed_precision = mixed_precision
        self.resize_mode = resize_mode
        self.intensity_window = intensity_window

        check_layers(self.layers, valid_layers)
        bad = [t for t in self.timesteps if not 0 <= t < num_train_timesteps]
        if not self.timesteps or bad:
            raise ValueError(f"timesteps must be integers in [0, {num_train_timesteps}), got {self.timesteps}.")
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}.")
        if pooling not in POOLING_CHOICES:
            raise ValueError(f"pooling must be one of {POOLING_CHOICES}, got {pooling!r}.")
        if pooling_grid_size < 1 or num_noise_samples < 1:
            raise ValueError("pooling_grid_size and num_noise_samples must be at least 1.")
        if hidden_size < 0:
            raise ValueError(f"hidden_size must be >= 0 (0: a single linear layer), got {hidden_size}.")
        if not 0.0 <= classifier_dropout < 1.0:
            raise ValueError(f"classifier_dropout must be in [0, 1), got {classifier_dropout}.")
        # `mic_diffrep.utils.MIXED_PRECISION_CHOICES`, spelled out: this file travels with remote-code model folders,
        # so it imports from its own folder only.
        check_choice(mixed_precision, ("no", "fp16", "bf16"), "mixed_precision")
        check_choice(resize_mode, RESIZE_MODES, "resize_mode")
        check_choice(prediction_type, ("epsilon", "sample", "v_prediction"), "prediction_type")
        check_choice(intensity_window, INTENSITY_WINDOWS, "intensity_window")
        super().__init__(**kwargs)
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {PROBLEM_TYPES[1:]} (or None to infer it from the labels), "
                             f"got {self.problem_type!r}.")

    @property
    def preprocessing(self) -> ImagePreprocessing:
        return ImagePreprocessing(self.resolution, self.resize_mode, self.intensity_window)

    @property
    def resolution(self) -> int:
        size = self.unet_config.get("sample_size", 112)
        return size if isinstance(size, int) else size[0]
