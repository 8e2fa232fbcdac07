"""Configuration of the self-supervised baselines (saved as `baseline_config.json` beside the weights)."""

from dataclasses import dataclass, field
from typing import List, Optional


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
    # The slices of NIfTI volumes pretraining read (`--slice_axis`, `--slice_range`, `--keep_empty_slices`).
    slice_axis: int = 2
    slice_range: Optional[List[int]] = None
    keep_empty_slices: bool = False
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
            raise ValueError(f"`method` must be one of {METHODS}, got {self.method!r}.")
        if self.method == "mae" and self.resolution % self.mae_patch_size:
            raise ValueError(f"`resolution` {self.resolution} must be divisible by the MAE patch size "
                             f"{self.mae_patch_size}.")
