"""MicDiffRep for image classification: a frozen DDPM UNet as feature extractor, with an MSFA head."""

import math
import os
from typing import Optional, Tuple, Union

import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention
from transformers.utils.generic import can_return_tuple

from .configuration_mic_diffrep import MicDiffRepConfig
from .unet_features import block_channels, feature_noise, noisy_block_features, pooled_size


class MicDiffRepMSFAHead(nn.Module):
    """Multi-scale feature aggregation (paper eqs. 4-6): `F = concat(F_1..F_n)`, `F_agg = ReLU(W F)`,
    `logits = M F_agg` (softmax gives the class probabilities). With `hidden_size=0` it is one linear layer."""

    def __init__(self, in_features: int, hidden_size: int, num_labels: int, dropout: float = 0.0):
        super().__init__()
        if hidden_size > 0:
            self.aggregate = nn.Linear(in_features, hidden_size)  # W (eq. 5)
            self.activation = nn.ReLU()
            self.dropout = nn.Dropout(dropout)
            self.classifier = nn.Linear(hidden_size, num_labels)  # M (eq. 6)
        else:
            self.aggregate = None
            self.dropout = nn.Dropout(dropout)
            self.classifier = nn.Linear(in_features, num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # Each layer gets its own dtype: one re-initialised in another precision at loading still runs.
        if self.aggregate is not None:
            features = self.activation(self.aggregate(features.to(self.aggregate.weight.dtype)))
        return self.classifier(self.dropout(features).to(self.classifier.weight.dtype))


def ddpm_alphas_cumprod(config: MicDiffRepConfig, device=None) -> torch.Tensor:
    """The cumulative products of the DDPM schedule of `config` (float32), computed on the CPU then moved."""
    with torch.device("cpu"):
        scheduler = DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                                  beta_start=config.beta_start, beta_end=config.beta_end)
    return scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)


class MicDiffRepPreTrainedModel(PreTrainedModel):
    config_class = MicDiffRepConfig
    base_model_prefix = "mic_diffrep"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # `from_pretrained(..., dtype=torch.bfloat16)` runs the UNet in bf16; the head, the standardisation and the noise
    # schedule stay float32, so predictions match the probe that trained the head on bf16 UNet features.
    _keep_in_fp32_modules_strict = ["head", "feature_mean", "feature_std", "alphas_cumprod"]
    # The loss is a mean over the batch: `Trainer` must scale it for gradient accumulation itself (with `True`, which
    # it infers from `**kwargs` in `forward`, it expects a sum over `num_items_in_batch` and the loss grows k-fold).
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module):
        # PyTorch's default initialisation, which diffusers' UNet2DModel and the probe's heads use, so that weights
        # missing from a checkpoint come back as a fresh UNet / head would; loaded weights are left alone.
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, MicDiffRepForImageClassification):
            init.zeros_(module.feature_mean)
            init.ones_(module.feature_std)
            init.copy_(module.alphas_cumprod, ddpm_alphas_cumprod(module.config))


class MicDiffRepForImageClassification(MicDiffRepPreTrainedModel):
    r"""
    A frozen DDPM-pretrained `UNet2DModel` whose block activations at fixed noise levels, pooled, standardised and
    concatenated, feed an MSFA head.

    Inference is deterministic: the noise added to an image at timestep t is drawn from `config.noise_seed`, t and the
    draw index (`unet_features.feature_noise` in this folder), exactly as
    `DiffusionFeaturePipeline.extract_features(..., generator=None)` draws it, so a head trained on the pipeline's
    features gives the same predictions here, for any subset of the timesteps and layers it was trained on.

    Conventions that differ from other image classifiers:
    - The UNet is frozen: `forward` runs it under `torch.no_grad()`, so `hidden_states` (the concatenated UNet
      features `F`, before standardisation) carry no gradient and only the head trains; `model.train()` leaves the
      UNet in eval mode (no dropout), so the head trains on the features it is evaluated on.
    - The noise schedule is a non-persistent buffer (`alphas_cumprod`, rebuilt from the config, never saved). It
      moves with `.to(device)` and is initialised after meta-device loading; the features always use the exact
      float32 values recomputed from the config (bf16 cannot hold them, and a cast back to float32 keeps the
      rounding).

    Example:

    ```python
    >>> import PIL.Image
    >>> from transformers import AutoModelForImageClassification, pipeline
    >>> import mic_diffrep  # registers the Auto classes
    >>> model = AutoModelForImageClassification.from_pretrained("runs/mic-diffrep/model")  # doctest: +SKIP
    >>> classify = pipeline("image-classification", model="runs/mic-diffrep/model")  # doctest: +SKIP
    >>> classify(PIL.Image.open("slice.jpg"))  # doctest: +SKIP
    [{'label': 'glioma', 'score': 0.91}, ...]

    ```
    """

    def __init__(self, config: MicDiffRepConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.unet = UNet2DModel(**config.unet_config)
        self.unet.requires_grad_(False)
        self.register_buffer("alphas_cumprod", torch.empty(config.num_train_timesteps), persistent=False)

        channels = block_channels(config.unet_config)
        self.feature_size = len(config.timesteps) * sum(
            pooled_size(channels[layer], config.pooling, config.pooling_grid_size) for layer in config.layers)
        self.register_buffer("feature_mean", torch.zeros(self.feature_size))
        self.register_buffer("feature_std", torch.ones(self.feature_size))
        self.head = MicDiffRepMSFAHead(self.feature_size, config.hidden_size, config.num_labels,
                                       config.classifier_dropout)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then the conventions loading does not keep: the UNet frozen (loaded
        parameters require gradients) and the head in float32 (one re-initialised by `ignore_mismatched_sizes`, a
        new `num_labels` say, would otherwise be in the loading dtype). Weights are read as safetensors only, unless
        `use_safetensors=False` is passed (a `pytorch_model.bin` is a pickle)."""
        kwargs.setdefault("use_safetensors", True)
        path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if (isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, "model_index.json"))
                and not os.path.isfile(os.path.join(path, "config.json"))):
            raise OSError(f"{path} is a pretrained pipeline folder (diffusers' model_index.json), not a MicDiffRep "
                          f"classifier: load it with `DiffusionFeaturePipeline.from_pretrained`, or make a classifier "
                          f"from it with `mic-diffrep probe --pretrained {path}`.")
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.unet.requires_grad_(False)
        if model.head.classifier.weight.device.type != "meta":
            model.head.float()
        return loaded

    def train(self, mode: bool = True):
        """`nn.Module.train`, with the frozen UNet kept in eval mode: its dropout (`--unet_dropout` pretrainings)
        would make the features the head trains on differ from those it is evaluated on."""
        super().train(mode)
        self.unet.eval()
        return self

    @property
    def dummy_inputs(self) -> dict:
        """A batch of one blank image, `{"pixel_values": (1, channels, resolution, resolution)}`."""
        channels = self.config.unet_config.get("out_channels", 1)
        return {"pixel_values": torch.zeros(1, channels, self.config.resolution, self.config.resolution,
                                            device=self.device)}

    def noise_schedule(self) -> torch.Tensor:
        """`alphas_cumprod` in float32 on the model's device, always the exact values from the config: a cast to
        bf16 and back would otherwise leave a rounded schedule (0.9961 for 0.9978 at t=10) and move the logits."""
        device = self.alphas_cumprod.device
        cached = getattr(self, "_exact_noise_schedule", None)
        if cached is None or cached.device != device:
            cached = self._exact_noise_schedule = ddpm_alphas_cumprod(self.config, device)
        return cached

    def extract_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Concatenated pooled UNet features `(B, feature_size)` in float32, before standardisation (the MSFA input
        F): timestep-major, layers in `config.layers` order, as `DiffusionFeaturesOutput.concatenate`."""
        config = self.config
        batch = pixel_values.shape[0]
        schedule = self.noise_schedule()
        clean = pixel_values.float()
        parts = []
        for t in config.timesteps:
            noise = feature_noise([config.noise_seed], t, config.num_noise_samples, pixel_values.shape[1:])
            noise = noise.to(clean.device).expand(batch, *noise.shape[1:])
            pooled = noisy_block_features(self.unet, schedule, clean, noise, t, config.layers, config.pooling,
                                          config.pooling_grid_size, config.flip_average, config.prediction_type)
            parts.extend(pooled[layer].float() for layer in config.layers)
        return torch.cat(parts, dim=1)

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (paper eq. 3), BCE-with-logits or MSE, by `config.problem_type` (inferred when unset, as in
        transformers' other `*ForImageClassification` models)."""
        labels = labels.to(logits.device)
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        logits = logits.float()
        if self.config.problem_type == "regression":
            if self.num_labels == 1:
                return nn.functional.mse_loss(logits.squeeze(-1), labels.squeeze(-1).float())
            return nn.functional.mse_loss(logits, labels.float())
        if self.config.problem_type == "single_label_classification":
            return nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.float())

    @can_return_tuple
    def forward(
        self,
        pixel_values: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[Tuple, ImageClassifierOutputWithNoAttention]:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 1, resolution, resolution)`):
            images in [-1, 1], as made by [`MicDiffRepImageProcessor`].
        labels (`torch.Tensor`, *optional*):
            class indices `(batch_size,)` for `single_label_classification` (the cross-entropy of paper eq. 3),
            multi-hot `(batch_size, num_labels)` floats for `multi_label_classification`, or targets for
            `regression` (`config.problem_type`).
        output_hidden_states (`bool`, *optional*, defaults to `config.output_hidden_states`):
            also return the concatenated UNet features `F` (before standardisation).
        """
        if pixel_values is None:
            raise ValueError("pixel_values is required.")
        expected = (self.config.unet_config.get("out_channels", 1), self.config.resolution, self.config.resolution)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must have shape (batch_size, {', '.join(map(str, expected))}), got "
                             f"{tuple(pixel_values.shape)}; use MicDiffRepImageProcessor to prepare images.")
        # uint8 pixels or 0..255 floats gave confident nonsense (every image one class): refused, not scored
        if not pixel_values.is_floating_point() or (
                pixel_values.numel() and pixel_values.detach().abs().amax().item() > 1.0 + 1e-3):
            raise ValueError(f"pixel_values must be floats in [-1, 1], got {pixel_values.dtype} values in "
                             f"[{pixel_values.min().item():g}, {pixel_values.max().item():g}]; use "
                             f"MicDiffRepImageProcessor to prepare images.")
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        if len(pixel_values):
            with torch.no_grad():
                features = self.extract_features(pixel_values)
        else:  # an empty batch (the UNet cannot reshape nothing): empty outputs, as other image classifiers give
            features = self.feature_mean.new_zeros((0, self.feature_mean.shape[-1]))
        standardized = (features.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std
        logits = self.head(standardized)
        loss = self.compute_loss(logits, labels) if labels is not None else None
        return ImageClassifierOutputWithNoAttention(
            loss=loss, logits=logits, hidden_states=(features,) if output_hidden_states else None)
