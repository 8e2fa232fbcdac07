"""The UNet that MicDiffRep pretrains, and the noise schedule it is trained with."""

import json
import logging
import os
from typing import Optional

import torch
from diffusers import DDPMScheduler, UNet2DModel

from .preprocessing import check_resolution


class _NoEmptyFp32ModulesWarning(logging.Filter):
    """Drops diffusers 0.42's warning "There are modules in UNet2DModel that should be kept in float32: []" on
    every `.to(dtype)` cast (`ModelMixin.to` tests `self._keep_in_fp32_modules or []` against None): with an empty
    list nothing is kept apart, so the bf16 casts of the pipeline, the probe and the classifier are exact. A warning
    naming modules still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFp32ModulesWarning())


# Grey-image UNets: four levels (e.g. 112 -> 56 -> 28 -> 14 px), one ResNet block per level, self-attention at the
# lowest resolution. "small" is the default (`DEFAULT_UNET`): chosen on validation accuracy at an equal CPU budget
# (`benchmarks/results/ablations.md`), where its 2.2x more steps beat the width of "base".
UNET_PRESETS = {
    # 4.3M parameters: the UNet of the first benchmarks, and of `mic-diffrep run --config paper`.
    "base": {
        "in_channels": 1,
        "out_channels": 1,
        "layers_per_block": 1,
        "block_out_channels": (32, 64, 128, 128),
        "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
        "attention_head_dim": 32,
    },
    # A few thousand parameters: for tests at 16-32 px (at 64 px its attention at 32x32 makes it slower than "mini").
    "tiny": {
        "in_channels": 1,
        "out_channels": 1,
        "layers_per_block": 1,
        "block_out_channels": (8, 16),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 4,
        "attention_head_dim": 8,
    },
}
# "base" at half the width (1.1M parameters): about 2.2x the training images per CPU-minute.
UNET_PRESETS["small"] = dict(UNET_PRESETS["base"], block_out_channels=(16, 32, 64, 64), attention_head_dim=16)
# "base" at a quarter of the width (0.27M parameters): about 1.6x the training images per CPU-minute of "small".
UNET_PRESETS["mini"] = dict(UNET_PRESETS["base"], block_out_channels=(8, 16, 32, 32), attention_head_dim=8)


DEFAULT_UNET = "small"


def load_unet_config(model_config_name_or_path: Optional[str] = None) -> dict:
    """The `UNet2DModel` settings of a preset name (`UNET_PRESETS`), a UNet `config.json`, or a folder holding one
    (default: `DEFAULT_UNET`)."""
    name = model_config_name_or_path or DEFAULT_UNET
    if name in UNET_PRESETS:
        return dict(UNET_PRESETS[name])
    path = os.path.join(name, "config.json") if os.path.isdir(name) else name
    if not os.path.isfile(path):
        raise ValueError(f"`model_config_name_or_path` {name!r} is neither a preset ({', '.join(UNET_PRESETS)}) nor a "
                         f"UNet config.json file or a folder containing one.")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"`model_config_name_or_path` {path!r} is not a JSON file: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"`model_config_name_or_path` {path!r} does not hold a UNet config (a JSON object).")
    kind = config.get("_class_name") or (config.get("model_type") and f"a {config['model_type']!r} model")
    if kind not in (None, UNet2DModel.__name__):  # a classifier folder, a pipeline's other component
        raise ValueError(f"`model_config_name_or_path` {path!r} is the config of {kind}, not of a UNet2DModel: give "
                         f"a preset, a UNet config.json, or a pipeline's unet/ folder.")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def create_unet(resolution: int, model_config_name_or_path: Optional[str] = None,
                self_conditioning: bool = False, dropout: Optional[float] = None) -> UNet2DModel:
    """Builds a freshly initialised `UNet2DModel` for `resolution` x `resolution` grey images.

    Args:
        resolution (`int`): the image size; must be divisible by the UNet's downsampling factor.
        model_config_name_or_path (`str`, *optional*):
            a preset name (`"small"`, `"base"`, `"mini"`, `"tiny"`), a UNet `config.json`, or a folder holding one (a
            pretrained pipeline folder's `unet/` works). Defaults to `DEFAULT_UNET` (`"small"`).
        self_conditioning (`bool`, defaults to `False`): twice the input channels, for the UNet's own clean-image
            estimate beside the noisy image (`--self_conditioning`).
        dropout (`float`, *optional*): dropout probability in the UNet's ResNet blocks (`UNet2DModel`'s `dropout`),
            replacing the config's (`--unet_dropout`).

    Example:

    ```python
    >>> from mic_diffrep import create_unet
    >>> unet = create_unet(32, "tiny")
    >>> unet.config.sample_size, unet.config.in_channels
    (32, 1)

    ```
    """
    config = load_unet_config(model_config_name_or_path)
    config["sample_size"] = resolution
    if self_conditioning:
        config["in_channels"] = 2 * config["out_channels"]
    if dropout is not None:
        config["dropout"] = dropout
    unet = UNet2DModel(**config)
    check_resolution(resolution, multiple_of=downsampling_factor(unet))
    return unet


@torch.no_grad()
def mirror_symmetrize(unet: torch.nn.Module) -> None:
    """Makes every convolution kernel of `unet` its own left-right mirror image, in place: `(w + w.flip(-1)) / 2`.

    A UNet whose kernels are all so is left-right equivariant block by block (up to the one-pixel offset of its
    stride-2 downsampling), so the pooled features of an image and of its mirror image nearly agree. Random flips
    of the training images do not give that: a channel may learn a kernel and another its mirror image, and the
    pooled features of a mirrored image then have the two swapped. `--mirror_symmetric_kernels` applies this at
    initialisation and after every optimizer step (a projected gradient step).

    ```python
    >>> unet = create_unet(16, "tiny")
    >>> mirror_symmetrize(unet)
    >>> all(torch.equal(m.weight, m.weight.flip(-1)) for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
    True

    ```
    """
    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size[-1] > 1:
            module.weight.copy_((module.weight + module.weight.flip(-1)) / 2)


def downsampling_factor(unet: UNet2DModel) -> int:
    """How much the UNet shrinks its input: the resolution must be a multiple of this."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


# The beta schedules of diffusers' `DDPMScheduler`.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


def create_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear", prediction_type: str = "epsilon"):
    """The paper's DDPM noise schedule: 1000 steps, linear betas, epsilon prediction."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction_type=prediction_type
    )
