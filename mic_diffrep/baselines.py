"""Self-supervised baselines of the paper's Table 1: MoCo v2, BYOL (small ResNet encoder) and MAE (transformers'
`ViTMAEForPreTraining`), sized for 64-112 px grey images, and their frozen encoders as feature extractors.

```python
>>> import torch
>>> from mic_diffrep.baselines import create_baseline
>>> model = create_baseline("byol", resolution=32)
>>> loss = model(torch.rand(4, 1, 32, 32) * 2 - 1, generator=torch.Generator().manual_seed(0))
>>> bool(torch.isfinite(loss))
True
```
"""

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .augmentations import GreyAugment
from .preprocessing import ImagePreprocessing


METHODS = ("mocov2", "byol", "mae")
CONFIG_NAME = "baseline_config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class BaselineConfig:
    """Everything needed to rebuild a baseline (saved as `baseline_config.json`)."""

    method: str
    resolution: int = 64
    resize_mode: str = "pad"
    intensity_window: str = "percentile"
    encoder_widths: List[int] = field(default_factory=lambda: [32, 64, 128, 256])
    projection_dim: int = 128
    hidden_dim: int = 1024
    queue_size: int = 4096
    temperature: float = 0.2
    momentum: float = 0.99
    mae_patch_size: int = 8
    mae_hidden_size: int = 192
    mae_num_layers: int = 6
    mae_mask_ratio: float = 0.75

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}.")
        if self.method == "mae" and self.resolution % self.mae_patch_size:
            raise ValueError(f"--resolution {self.resolution} must be divisible by the MAE patch size "
                             f"{self.mae_patch_size}.")


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity() if stride == 1 and in_channels == out_channels else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-style encoder for one-channel images: a stem, one basic block per stage, global average pooling."""

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 256)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, in_channels = [], widths[0]
        for i, width in enumerate(widths):
            stages.append(BasicBlock(in_channels, width, stride=1 if i == 0 else 2))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.output_dim = widths[-1]

    def forward(self, x):
        return self.stages(self.stem(x)).mean(dim=(2, 3))


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(),
                         nn.Linear(hidden_dim, out_dim))


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` that takes no gradients (a momentum / EMA target)."""
    return copy.deepcopy(module).requires_grad_(False)


@torch.no_grad()
def momentum_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """`target = momentum * target + (1 - momentum) * online`, parameter by parameter (buffers copied)."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.mul_(momentum).add_(o.detach(), alpha=1 - momentum)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)


class MoCoV2(nn.Module):
    """MoCo v2 (Chen et al. 2020): query encoder + MLP head, momentum key encoder, a queue of negatives, InfoNCE."""

    def __init__(self, config: BaselineConfig):
        super().__init__()
        self.config = config
        self.encoder = SmallResNet(config.encoder_widths)
        self.head = mlp(self.encoder.output_dim, config.hidden_dim, config.projection_dim)
        self.key_encoder, self.key_head = frozen_copy(self.encoder), frozen_copy(self.head)
        self.register_buffer("queue", F.normalize(torch.randn(config.queue_size, config.projection_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.augment = GreyAugment()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replaces the oldest keys of the queue with `keys` (wrapping around)."""
        size, ptr = self.queue.shape[0], int(self.queue_ptr)
        index = (torch.arange(len(keys), device=keys.device) + ptr) % size
        self.queue[index] = keys.detach().to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + len(keys)) % size)

    def forward(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        view_q, view_k = self.augment(images, generator), self.augment(images, generator)
        q = F.normalize(self.head(self.encoder(view_q)), dim=1)
        with torch.no_grad():
            k = F.normalize(self.key_head(self.key_encoder(view_k)), dim=1)
        positives = (q * k).sum(dim=1, keepdim=True)
        negatives = q @ self.queue.clone().detach().to(q.dtype).T
        logits = torch.cat([positives, negatives], dim=1) / self.config.temperature
        loss = F.cross_entropy(logits.float(), torch.zeros(len(q), dtype=torch.long, device=q.device))
        self.enqueue(k)
        return loss

    def after_optimizer_step(self, progress: float) -> None:
        momentum_update(self.key_encoder, self.encoder, self.config.momentum)
        momentum_update(self.key_head, self.head, self.config.momentum)


class BYOL(nn.Module):
    """BYOL (Grill et al. 2020): online encoder + projector + predictor, an EMA target network, cosine loss."""

    def __init__(self, config: BaselineConfig):
        super().__init__()
        self.config = config
        self.encoder = SmallResNet(config.encoder_widths)
        self.projector = mlp(self.encoder.output_dim, config.hidden_dim, config.projection_dim)
        self.predictor = mlp(config.projection_dim, config.hidden_dim, config.projection_dim)
        self.target_encoder, self.target_projector = frozen_copy(self.encoder), frozen_copy(self.projector)
        self.augment = GreyAugment()

    def forward(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        view_1, view_2 = self.augment(images, generator), self.augment(images, generator)
        online = [self.predictor(self.projector(self.encoder(v))) for v in (view_1, view_2)]
        with torch.no_grad():
            target = [self.target_projector(self.target_encoder(v)) for v in (view_2, view_1)]
        losses = [2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=1) for p, z in zip(online, target)]
        return (losses[0] + losses[1]).mean()

    def after_optimizer_step(self, progress: float) -> None:
        """EMA of the target with BYOL's cosine schedule from `momentum` to 1 over training (`progress` in [0, 1])."""
        tau = 1 - (1 - self.config.momentum) * (math.cos(math.pi * min(progress, 1.0)) + 1) / 2
        momentum_update(self.target_encoder, self.encoder, tau)
        momentum_update(self.target_projector, self.projector, tau)


class MAE(nn.Module):
    """MAE (He et al. 2022) through transformers' `ViTMAEForPreTraining`, small enough for 64-112 px grey images."""

    def __init__(self, config: BaselineConfig):
        super().__init__()
        from transformers import ViTMAEConfig, ViTMAEForPreTraining

        self.config = config
        heads = max(1, config.mae_hidden_size // 64)
        self.mae = ViTMAEForPreTraining(ViTMAEConfig(
            image_size=config.resolution, patch_size=config.mae_patch_size, num_channels=1,
            hidden_size=config.mae_hidden_size, num_hidden_layers=config.mae_num_layers, num_attention_heads=heads,
            intermediate_size=4 * config.mae_hidden_size, decoder_hidden_size=128, decoder_num_hidden_layers=2,
            decoder_num_attention_heads=4, decoder_intermediate_size=512, mask_ratio=config.mae_mask_ratio,
            norm_pix_loss=True))

    def forward(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        noise = None
        if generator is not None:
            num_patches = (self.config.resolution // self.config.mae_patch_size) ** 2
            noise = torch.rand(len(images), num_patches, generator=generator).to(images.device)
        return self.mae(pixel_values=images, noise=noise).loss

    def after_optimizer_step(self, progress: float) -> None:
        pass


def create_baseline(method: str, resolution: int = 64, **kwargs) -> nn.Module:
    """A freshly initialised MoCo v2, BYOL or MAE model for `resolution` px grey images."""
    config = BaselineConfig(method=method, resolution=resolution, **kwargs)
    return {"mocov2": MoCoV2, "byol": BYOL, "mae": MAE}[method](config)


def save_baseline(model: nn.Module, output_dir: str) -> None:
    """Writes `baseline_config.json` and `model.safetensors` (weights only) into `output_dir`, atomically."""
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = os.path.join(output_dir, f".{WEIGHTS_NAME}.tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(output_dir, WEIGHTS_NAME))
    with open(os.path.join(output_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(asdict(model.config), f, indent=2)


def is_baseline_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_NAME))


def load_baseline(path: str) -> nn.Module:
    from safetensors.torch import load_file

    with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
        config = BaselineConfig(**json.load(f))
    model = {"mocov2": MoCoV2, "byol": BYOL, "mae": MAE}[config.method](config)
    model.load_state_dict(load_file(os.path.join(path, WEIGHTS_NAME)))
    return model.eval()


class BaselineFeatureExtractor:
    """The frozen encoder of a baseline, with the `extract_features` interface of `DiffusionFeaturePipeline`.

    Its one layer is `"encoder"` (pooled encoder output: global average for the ResNet, mean of patch tokens for
    MAE); timesteps do not apply and are reported as `0`.
    """

    layer_names = ["encoder"]

    def __init__(self, model: nn.Module, source: Optional[str] = None):
        self.model = model.eval()
        self.source = source
        self.config = model.config
        self.resolution = model.config.resolution

    @property
    def preprocessing(self) -> ImagePreprocessing:
        return ImagePreprocessing(self.resolution, self.config.resize_mode, self.config.intensity_window)

    @classmethod
    def from_pretrained(cls, path: str) -> "BaselineFeatureExtractor":
        return cls(load_baseline(path), source=path)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def to(self, *args, **kwargs):
        """Moves or casts the encoder, like `nn.Module.to` (`extractor.to(torch.bfloat16)` runs it in bf16)."""
        self.model.to(*args, **kwargs)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def set_progress_bar_config(self, **kwargs):
        pass

    def check_inputs(self, timesteps, layers, *args):
        from .unet_features import check_layers

        check_layers(layers, self.layer_names)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(self.model, MAE):
            vit = self.model.mae.vit
            ratio, vit.config.mask_ratio = vit.config.mask_ratio, 0.0
            try:
                hidden = vit(pixel_values=images).last_hidden_state
            finally:
                vit.config.mask_ratio = ratio
            return hidden[:, 1:].mean(dim=1).float()  # mean of patch tokens (order is irrelevant to the mean)
        return self.model.encoder(images).float()

    def extract_features(self, images, timesteps=(0,), layers=None, *, batch_size: int = 64, **unused):
        from .pipelines import DiffusionFeaturesOutput
        from .preprocessing import pixels_to_model_input

        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4):
            from .preprocessing import as_image_list

            images = torch.stack([self.preprocessing(i) for i in as_image_list(images)])
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = pixels_to_model_input(images[start : start + batch_size]).to(self.device, self.dtype)
            chunks.append(self.encode(batch))
        features = torch.cat(chunks).cpu()
        return DiffusionFeaturesOutput(features={("encoder", int(t)): features for t in timesteps},
                                       layers=["encoder"], timesteps=[int(t) for t in timesteps])


class ClipFeatureExtractor(BaselineFeatureExtractor):
    """A local `CLIPVisionModel` (no download: pass a folder you have) as a frozen feature extractor.

    Grey images are repeated to three channels, resized to the model's input size and normalised with CLIP's mean
    and std; the feature is the pooled output.
    """

    MEAN = (0.48145466, 0.4578275, 0.40821073)
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, model, source: Optional[str] = None, resolution: int = 112, resize_mode: str = "pad"):
        self.model = model.eval()
        self.source = source
        self.resolution = resolution
        self.config = model.config
        self.config.resize_mode = resize_mode
        self.config.intensity_window = "percentile"

    @classmethod
    def from_pretrained(cls, path: str, resolution: int = 112) -> "ClipFeatureExtractor":
        from transformers import CLIPVisionModel

        return cls(CLIPVisionModel.from_pretrained(path, local_files_only=True), source=path, resolution=resolution)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        size = self.model.config.image_size
        x = F.interpolate((images + 1) / 2, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        x = x.repeat(1, 3, 1, 1)
        mean = torch.tensor(self.MEAN, device=x.device)[None, :, None, None]
        std = torch.tensor(self.STD, device=x.device)[None, :, None, None]
        return self.model(pixel_values=((x - mean) / std).to(self.model.dtype)).pooler_output.float()


def is_clip_vision_dir(path: str) -> bool:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file, encoding="utf-8") as f:
        return json.load(f).get("model_type") in ("clip", "clip_vision_model")
