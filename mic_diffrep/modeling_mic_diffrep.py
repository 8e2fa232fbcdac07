"""MicDiffRep for image classification: a frozen DDPM UNet as feature extractor, with an MSFA head."""

from typing import Optional, Tuple, Union

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention
from transformers.utils.generic import can_return_tuple

from .configuration_mic_diffrep import MicDiffRepConfig
from .unet_features import block_channels, pooled_size, unet_block_features


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
        if self.aggregate is not None:
            features = self.activation(self.aggregate(features))
        return self.classifier(self.dropout(features))


class MicDiffRepPreTrainedModel(PreTrainedModel):
    config_class = MicDiffRepConfig
    base_model_prefix = "mic_diffrep"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    @torch.no_grad()
    def _init_weights(self, module):
        # Only the head is initialised here: the UNet keeps diffusers' own initialisation (or its loaded weights).
        if isinstance(module, MicDiffRepMSFAHead):
            for linear in (module.aggregate, module.classifier):
                if linear is not None:
                    init.normal_(linear.weight, mean=0.0, std=0.02)
                    init.zeros_(linear.bias)
        elif isinstance(module, MicDiffRepForImageClassification):
            init.zeros_(module.feature_mean)
            init.ones_(module.feature_std)


class MicDiffRepForImageClassification(MicDiffRepPreTrainedModel):
    r"""
    A frozen DDPM-pretrained `UNet2DModel` whose block activations at fixed noise levels, pooled, standardised and
    concatenated, feed an MSFA head.

    Inference is deterministic: the noise added to every image is fixed by `config.noise_seed`, and equals the noise
    of `DiffusionFeaturePipeline.extract_features(..., generator=None)`, so a head trained on those features applies
    unchanged.

    Example:

    ```python
    >>> from transformers import AutoModelForImageClassification, pipeline
    >>> import mic_diffrep  # registers the Auto classes
    >>> model = AutoModelForImageClassification.from_pretrained("runs/probe")  # doctest: +SKIP
    >>> classify = pipeline("image-classification", model="runs/probe")  # doctest: +SKIP
    >>> classify(PIL.Image.open("slice.jpg"))  # doctest: +SKIP
    [{'label': 'glioma', 'score': 0.91}, ...]
    ```
    """

    def __init__(self, config: MicDiffRepConfig):
        super().__init__(config)
        from diffusers import DDPMScheduler, UNet2DModel

        self.num_labels = config.num_labels
        self.unet = UNet2DModel(**config.unet_config)
        self.unet.requires_grad_(False)
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
            beta_start=config.beta_start, beta_end=config.beta_end)

        channels = block_channels(config.unet_config)
        self.feature_size = len(config.timesteps) * sum(
            pooled_size(channels[layer], config.pooling, config.pooling_grid_size) for layer in config.layers)
        self.register_buffer("feature_mean", torch.zeros(self.feature_size))
        self.register_buffer("feature_std", torch.ones(self.feature_size))
        self.head = MicDiffRepMSFAHead(self.feature_size, config.hidden_size, config.num_labels,
                                       config.classifier_dropout)
        self.post_init()

    def fixed_noise(self) -> torch.Tensor:
        """The noise added at inference, `(T, K, 1, R, R)`: drawn from `config.noise_seed` exactly as
        `DiffusionFeaturePipeline.extract_features(..., generator=None)` draws it for every image."""
        config, resolution = self.config, self.config.resolution
        return torch.randn((len(config.timesteps), config.num_noise_samples, 1, resolution, resolution),
                           generator=torch.Generator().manual_seed(config.noise_seed))

    def extract_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Concatenated pooled UNet features `(B, feature_size)`, before standardisation (the MSFA input F)."""
        config = self.config
        draws = config.num_noise_samples
        noise = self.fixed_noise().to(pixel_values.device)
        clean = pixel_values.float().repeat_interleave(draws, dim=0)
        parts = []
        for i, t in enumerate(config.timesteps):
            timesteps = torch.full((len(clean),), t, dtype=torch.long, device=clean.device)
            noisy = self.noise_scheduler.add_noise(clean, noise[i].repeat(pixel_values.shape[0], 1, 1, 1), timesteps)
            pooled = unet_block_features(self.unet, noisy.to(self.unet.dtype), timesteps, config.layers,
                                         config.pooling, config.pooling_grid_size)
            for layer in config.layers:
                parts.append(pooled[layer].view(pixel_values.shape[0], draws, -1).mean(dim=1))
        return torch.cat(parts, dim=1)

    @can_return_tuple
    def forward(
        self,
        pixel_values: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[Tuple, ImageClassifierOutputWithNoAttention]:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 1, resolution, resolution)`):
            images in [-1, 1], as made by [`MicDiffRepImageProcessor`].
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            class indices; the cross-entropy loss (paper eq. 3) is returned when given.
        output_hidden_states (`bool`, *optional*):
            also return the concatenated UNet features `F` (before standardisation).
        """
        if pixel_values is None:
            raise ValueError("pixel_values is required.")
        expected = (1, self.config.resolution, self.config.resolution)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must have shape (batch_size, {', '.join(map(str, expected))}), got "
                             f"{tuple(pixel_values.shape)}; use MicDiffRepImageProcessor to prepare images.")
        with torch.no_grad():
            features = self.extract_features(pixel_values)
        logits = self.head((features - self.feature_mean) / self.feature_std)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels.to(logits.device))
        return ImageClassifierOutputWithNoAttention(
            loss=loss, logits=logits, hidden_states=(features,) if output_hidden_states else None)
