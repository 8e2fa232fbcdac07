"""Pooled activations of UNet blocks for noised images: the noise, and one hooked forward pass.

Shared by `DiffusionFeaturePipeline.extract_features` and `MicDiffRepForImageClassification`, so probe features and
classifier features are the same computation:

- `feature_noise`: the noise added to an image is a function of `(noise seed, timestep, noise draw)` only, never of
  the position of the timestep in a list, so features at t=300 are the same whether 300 was asked for alone or
  as part of a sweep.
- `noisy_block_features`: `x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise`, one UNet forward with
  hooks on the requested blocks, pooled, averaged over the noise draws.

```python
>>> import torch
>>> from mic_diffrep import create_unet
>>> from mic_diffrep.models.mic_diffrep.unet_features import block_names, unet_block_features
>>> unet = create_unet(16, "tiny")
>>> block_names(unet)
['down_blocks.0', 'down_blocks.1', 'mid_block', 'up_blocks.0', 'up_blocks.1']
>>> features = unet_block_features(unet, torch.randn(2, 1, 16, 16), 100, ["mid_block"])
>>> features["mid_block"].shape
torch.Size([2, 16])

```
"""

from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F


POOLING_CHOICES = ("avg", "avgmax", "grid")

# The read-out chosen in the ablation study (`benchmarks/results/ablations.md`): low noise levels, where the default
# recipe (`--timestep_power 3`) spends its training, and each block's average and max over positions.
DEFAULT_TIMESTEPS = (10, 25, 50, 100, 250)
DEFAULT_POOLING = "avgmax"


class _StopForward(Exception):
    """Raised by the last needed hook so the rest of the UNet is not computed."""


def block_names(unet) -> List[str]:
    """The layer names features can be taken from, in execution order: down blocks, mid block, up blocks."""
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    if unet.mid_block is not None:
        names.append("mid_block")
    return names + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]


def block_names_from_config(unet_config: dict) -> List[str]:
    """`block_names` from a `UNet2DModel` config dict, without building the model."""
    num_down = len(unet_config.get("down_block_types", ()))
    num_up = len(unet_config.get("up_block_types", ()))
    names = [f"down_blocks.{i}" for i in range(num_down)]
    if unet_config.get("mid_block_type", "UNetMidBlock2D") is not None:
        names.append("mid_block")
    return names + [f"up_blocks.{i}" for i in range(num_up)]


def check_layers(layers: Sequence[str], valid: Sequence[str]) -> None:
    if not layers:
        raise ValueError(f"`layers` is empty: name at least one of {', '.join(valid)} (or None for all of them).")
    unknown = [name for name in layers if name not in valid]
    if unknown:
        raise ValueError(f"Unknown layer name(s) {unknown}. Valid layers are: {', '.join(valid)}.")


def pool_features(hidden_states: torch.Tensor, pooling: str = "avg", grid_size: int = 2) -> torch.Tensor:
    """Pools `(B, C, H, W)` activations into float32 `(B, D)` vectors.

    `"avg"`: global average (D = C); `"avgmax"`: global average and max (D = 2C); `"grid"`: average over a
    `grid_size` x `grid_size` grid of regions (D = C * grid_size**2), which keeps coarse spatial layout.
    """
    hidden_states = hidden_states.float()
    if pooling == "avg":
        return hidden_states.mean(dim=(2, 3))
    if pooling == "avgmax":
        return torch.cat([hidden_states.mean(dim=(2, 3)), hidden_states.amax(dim=(2, 3))], dim=1)
    if pooling == "grid":
        height, width = hidden_states.shape[-2:]
        if grid_size > min(height, width):  # adaptive pooling would repeat positions, not pool regions
            raise ValueError(f"pooling_grid_size {grid_size} is larger than a {height}x{width} feature map (the "
                             f"UNet's deepest blocks at this resolution): use at most {min(height, width)}.")
        return F.adaptive_avg_pool2d(hidden_states, grid_size).flatten(1)
    raise ValueError(f"pooling must be one of {POOLING_CHOICES}, got {pooling!r}.")


def pooled_size(channels: int, pooling: str = "avg", grid_size: int = 2) -> int:
    """Length of the vector `pool_features` makes from `channels` channels."""
    return {"avg": channels, "avgmax": 2 * channels, "grid": channels * grid_size**2}[pooling]


def block_channels(unet_config: dict) -> Dict[str, int]:
    """Output channels of every block of a `UNet2DModel` config."""
    channels = list(unet_config["block_out_channels"])
    result = {f"down_blocks.{i}": c for i, c in enumerate(channels)}
    result["mid_block"] = channels[-1]
    result.update({f"up_blocks.{i}": c for i, c in enumerate(reversed(channels))})
    return result


def unet_block_features(unet, noisy_images: torch.Tensor, timestep, layers: Sequence[str], pooling: str = "avg",
                        grid_size: int = 2) -> Dict[str, torch.Tensor]:
    """Runs `unet` once on `noisy_images` at `timestep` and returns the pooled output of each block in `layers`.

    Forward hooks are registered by module name and removed in `finally`, also when the forward raises. Down
    blocks return `(hidden_states, res_samples)`: the hidden states are pooled. The forward stops after the last
    block needed.
    """
    modules = dict(unet.named_modules())
    check_layers(layers, [name for name in modules if name])
    captured: Dict[str, torch.Tensor] = {}
    wanted = set(layers)

    def make_hook(name):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured[name] = pool_features(hidden, pooling, grid_size)
            if wanted.issubset(captured):
                raise _StopForward

        return hook

    if not torch.is_tensor(timestep):
        timestep = torch.full((noisy_images.shape[0],), int(timestep), device=noisy_images.device, dtype=torch.long)
    handles = []
    try:
        for name in dict.fromkeys(layers):
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        try:
            unet(noisy_images, timestep)
        except _StopForward:
            pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: captured[name] for name in layers}


def is_self_conditioned(unet_config) -> bool:
    """Whether a UNet (or its config dict) takes its own clean-image estimate beside the noisy image
    (`--self_conditioning`): twice as many input channels as output channels."""
    config = getattr(unet_config, "config", unet_config)
    return config["in_channels"] == 2 * config["out_channels"]


def predicted_clean(prediction: torch.Tensor, noisy: torch.Tensor, alpha_bar: torch.Tensor,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    """The clean image `x_0` a UNet `prediction` of `prediction_type` implies for `noisy` images at noise level
    `alpha_bar` (a scalar or `(B, 1, 1, 1)` tensor), in float32 and clipped to [-1, 1]."""
    prediction, noisy, alpha_bar = prediction.float(), noisy.float(), alpha_bar.float()
    if prediction_type == "epsilon":
        clean = (noisy - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
    elif prediction_type == "sample":
        clean = prediction
    elif prediction_type == "v_prediction":
        clean = alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * prediction
    else:
        raise ValueError(f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {prediction_type!r}.")
    return clean.clamp(-1, 1)


def self_conditioned_input(unet, noisy: torch.Tensor, timestep, alpha_bar: torch.Tensor,
                           prediction_type: str = "epsilon") -> torch.Tensor:
    """The input of a self-conditioned UNet: `noisy` beside the clean image the UNet estimates from `noisy` alone
    (a first forward with zeros in the estimate's place), as it was trained and as it samples."""
    first = unet(torch.cat([noisy, torch.zeros_like(noisy)], dim=1), timestep).sample
    return torch.cat([noisy, predicted_clean(first, noisy, alpha_bar, prediction_type).to(noisy.dtype)], dim=1)


def seed_for(*keys: int) -> int:
    """A 63-bit seed derived from integers, well mixed by `numpy.SeedSequence`."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


def feature_noise(seeds: Sequence[int], timestep: int, num_noise_samples: int, shape: Sequence[int]) -> torch.Tensor:
    """The noise added at `timestep` to images with per-image noise `seeds`: shape `(B, K, *shape)`, float32, CPU.

    Draw `k` of an image with seed `s` comes from a generator seeded with `seed_for(s, timestep, k)`, so it
    depends on the image's seed, the timestep and the draw, and on nothing else (not on the batch, nor on which
    other timesteps are extracted). Images sharing a seed share their noise (the fixed noise of the classifier).
    """
    draws = {}
    for seed in dict.fromkeys(int(s) for s in seeds):
        draws[seed] = torch.stack([
            torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed_for(seed, timestep, k)))
            for k in range(num_noise_samples)])
    return torch.stack([draws[int(s)] for s in seeds])


def add_noise(alphas_cumprod: torch.Tensor, clean: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
    """`sqrt(alpha_bar_t) * clean + sqrt(1 - alpha_bar_t) * noise` in float32 (DDPM's forward process at one `t`)."""
    alpha_bar = alphas_cumprod[int(timestep)].to(device=clean.device, dtype=torch.float32)
    return alpha_bar.sqrt() * clean.float() + (1 - alpha_bar).sqrt() * noise.float()


def noisy_block_features(unet, alphas_cumprod: torch.Tensor, clean: torch.Tensor, noise: torch.Tensor, timestep: int,
                         layers: Sequence[str], pooling: str = "avg", grid_size: int = 2,
                         flip_average: bool = False, prediction_type: str = "epsilon") -> Dict[str, torch.Tensor]:
    """Pooled features `(B, D)` of each block in `layers` for `clean` images `(B, C, R, R)` in [-1, 1], noised to
    `timestep` with `noise` `(B, K, C, R, R)`: the K draws are folded into one batch and their features averaged.
    With `flip_average`, each image is also mirrored left-right and noised with the same noise, and the two features
    are averaged: with one noise for every image, an image and its mirror image get the same features.

    The noised images are cast to the UNet's dtype, so a bf16 UNet (`unet.to(torch.bfloat16)`) runs in bf16. A
    self-conditioned UNet (`is_self_conditioned`) first estimates the clean images (its `prediction_type` says how
    to read its output), and its features are those of the forward that sees that estimate: twice the forwards.
    """
    batch, draws = noise.shape[:2]
    clean = clean.repeat_interleave(draws, dim=0)
    noise = noise.flatten(0, 1).to(clean.device)
    mirrors = [clean, clean.flip(-1)] if flip_average else [clean]
    noisy = torch.cat([add_noise(alphas_cumprod, image, noise, timestep) for image in mirrors]).to(unet.dtype)
    views = len(mirrors)
    if is_self_conditioned(unet):
        steps = torch.full((noisy.shape[0],), int(timestep), device=noisy.device, dtype=torch.long)
        noisy = self_conditioned_input(unet, noisy, steps, alphas_cumprod[int(timestep)].to(noisy.device),
                                       prediction_type)
    pooled = unet_block_features(unet, noisy, timestep, layers, pooling, grid_size)
    return {name: value.view(views, batch, draws, -1).mean(dim=(0, 2)) for name, value in pooled.items()}


def concatenate_features(features: Dict[tuple, torch.Tensor], layers: Sequence[str],
                         timesteps: Sequence[int]) -> torch.Tensor:
    """The MSFA input F (paper eq. 4): per-`(layer, timestep)` features side by side, timestep-major, layers in the
    given order: the order `MicDiffRepForImageClassification` concatenates them in. One layer may be given as a
    name, one timestep as an integer."""
    layers = [layers] if isinstance(layers, str) else layers
    timesteps = [timesteps] if isinstance(timesteps, int) or getattr(timesteps, "ndim", None) == 0 else timesteps
    if not len(layers) or not len(timesteps):
        raise ValueError(f"Concatenating features needs at least one layer and one timestep, got layers "
                         f"{list(layers)} and timesteps {list(timesteps)}.")
    missing = [(layer, int(t)) for t in timesteps for layer in layers if (layer, int(t)) not in features]
    if missing:
        raise KeyError(f"No features for {missing}: these features hold layers "
                       f"{list(dict.fromkeys(key[0] for key in features))} at timesteps "
                       f"{list(dict.fromkeys(key[1] for key in features))}.")
    return torch.cat([features[(layer, int(t))] for t in timesteps for layer in layers], dim=1)
