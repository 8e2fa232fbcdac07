"""Self-supervised baselines of the paper's Table 1: MoCo v2, BYOL (small ResNet encoder) and MAE (transformers'
`ViTMAEForPreTraining`), sized for 64-112 px grey images. `mic_diffrep.features.extractors` turns their frozen
encoders into feature extractors for the probe.

```python
>>> import torch
>>> from mic_diffrep.models.baselines import create_baseline
>>> model = create_baseline("byol", resolution=32)
>>> loss = model(torch.rand(4, 1, 32, 32) * 2 - 1, generator=torch.Generator().manual_seed(0))
>>> bool(torch.isfinite(loss))
True

```
"""

import json
import os
from dataclasses import asdict

from safetensors.torch import load_file
from torch import nn

from ...utils import save_safetensors
from .byol import BYOL
from .configuration import CONFIG_NAME, METHODS, WEIGHTS_NAME, BaselineConfig
from .mae import MAE
from .mocov2 import MoCoV2
from .resnet import SmallResNet, frozen_copy, momentum_update


MODEL_CLASSES = {"mocov2": MoCoV2, "byol": BYOL, "mae": MAE}


def create_baseline(method: str, resolution: int = 64, **kwargs) -> nn.Module:
    """A freshly initialised MoCo v2, BYOL or MAE model for `resolution` px grey images."""
    config = BaselineConfig(method=method, resolution=resolution, **kwargs)
    return MODEL_CLASSES[method](config)


def save_baseline(model: nn.Module, output_dir: str) -> None:
    """Writes `baseline_config.json` and `model.safetensors` (weights only) into `output_dir`, atomically."""
    os.makedirs(output_dir, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(state, os.path.join(output_dir, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(output_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(asdict(model.config), f, indent=2)


def is_baseline_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_NAME))


def load_baseline(path: str) -> nn.Module:
    with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
        config = BaselineConfig(**json.load(f))
    model = MODEL_CLASSES[config.method](config)
    model.load_state_dict(load_file(os.path.join(path, WEIGHTS_NAME)))
    return model.eval()


__all__ = ["BYOL", "MAE", "METHODS", "BaselineConfig", "MoCoV2", "SmallResNet", "create_baseline", "frozen_copy",
           "is_baseline_dir", "load_baseline", "momentum_update", "save_baseline"]
