"""Which features to extract: the settings shared by `mic-diffrep extract`, `mic-diffrep probe` and the library.

The dataclasses are the flags: `HfArgumentParser` turns every field into a `--field` flag with its `help`.
"""

import warnings
from dataclasses import dataclass, field
from typing import List, Literal, Optional

from ..data.medical import PRETRAINED_SLICE_HELP, SliceSelection, slice_selection
from ..models.mic_diffrep.unet_features import DEFAULT_POOLING, DEFAULT_TIMESTEPS
from ..utils import check_settings


@dataclass(kw_only=True)
class FeatureArguments:
    """Which features are taken from a frozen model, and how."""

    timesteps: List[int] = field(default_factory=lambda: list(DEFAULT_TIMESTEPS), metadata={
        "help": "Noise levels at which features are taken (baseline encoders ignore them)."})
    layers: Optional[List[str]] = field(default=None, metadata={
        "help": "UNet blocks (down_blocks.i, mid_block, up_blocks.i); default: all of them."})
    pooling: Literal["avg", "avgmax", "grid"] = field(default=DEFAULT_POOLING, metadata={
        "help": "Global average (the paper's), average and max concatenated (the default), or an average over a grid "
                "of regions. avgmax gave +0.6 points of MSFA validation accuracy over avg in the ablation (0.936 vs "
                "0.930; same UNet forwards, twice the feature width), but lower accuracy on test images from another "
                "source than the training images (benchmarks/results/ablations.md)."})
    pooling_grid_size: int = field(default=2, metadata={"help": "Grid size for --pooling grid."})
    num_noise_samples: int = field(default=1, metadata={"help": "Noise draws averaged per image."})
    flip_average: bool = field(default=False, metadata={
        "help": "Test-time flip averaging: average the features of each image and of its left-right mirror image "
                "(twice the forwards; applies to baseline encoders too)."})
    noise_seed: int = field(default=0, metadata={
        "help": "Seed of the fixed noise added to every image (the exported classifier uses the same)."})
    batch_size: int = field(default=16, metadata={
        "help": "Images per forward pass: small batches stay in the CPU's caches (on 2 cores 16 gives about twice the "
                "images/s of 128); on a GPU use a few hundred."})
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = field(default=None, metadata={
        "help": "'bf16' runs the frozen model in bf16 (about 2x faster on CPUs with AMX/AVX-512-BF16; fp16 is GPU "
                "only). Default: the accelerate config (`accelerate launch --mixed_precision`), else float32 "
                "('no')."})

    def __post_init__(self):
        if hasattr(self.timesteps, "tolist"):  # a numpy array or tensor, as `extract_features` takes them
            self.timesteps = self.timesteps.tolist()
        check_settings(self)
        if not self.timesteps:
            raise ValueError("`timesteps` must name at least one timestep.")
        self.timesteps = list(dict.fromkeys(self.timesteps))  # `--timesteps 10 10`: once (repeated rows broke caches)
        if self.layers is not None:
            self.layers = list(dict.fromkeys(self.layers))
        for name in ("pooling_grid_size", "num_noise_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")


@dataclass(kw_only=True)
class ExtractionArguments(FeatureArguments):
    """`mic-diffrep extract`: features of an image folder into a feature cache."""

    pretrained: str = field(metadata={"help": "Pretrained folder: a diffusion pipeline, a baseline or a local CLIP."})
    revision: Optional[str] = field(default=None, metadata={
        "help": "The revision (branch, tag or commit) of --pretrained when it is a Hub repository id (default: main)."})
    data_dir: str = field(metadata={"help": "Image folder (any layout pretraining takes)."})
    output: str = field(metadata={"help": "Feature cache file to write (.safetensors)."})
    splits: List[str] = field(default_factory=lambda: ["all"], metadata={
        "help": "Splits to extract (train, validation, test, or 'all')."})
    noise_seed: Optional[int] = field(default=None, metadata={"help": "Seed of the noise (default 0)."})
    seed: Optional[int] = field(default=None, metadata={
        "help": "Deprecated: --noise_seed (in `probe`, --seed seeds the probe's training)."})
    noise: Literal["fixed", "per_image"] = field(default="fixed", metadata={
        "help": "'fixed': every image gets the same noise (features are a function of the image alone, as in the "
                "classifier); 'per_image': independent noise per image, drawn from --noise_seed."})
    skip_bad_images: bool = field(default=False, metadata={"help": "Skip unreadable images instead of failing."})
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "Decoded-image cache folder (default: .cache beside --output)."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Processes decoding images."})
    slice_axis: Optional[int] = field(default=None, metadata={"help": PRETRAINED_SLICE_HELP["slice_axis"]})
    slice_range: Optional[List[int]] = field(default=None, metadata={"help": PRETRAINED_SLICE_HELP["slice_range"]})
    # Unset (None): the pretrained model's setting; bare `--keep_empty_slices` is true, `--keep_empty_slices false` off.
    keep_empty_slices: Optional[bool] = field(default=None, metadata={
        "help": PRETRAINED_SLICE_HELP["keep_empty_slices"], "nargs": "?", "const": True})

    def __post_init__(self):
        super().__post_init__()
        if self.seed is not None:  # one name per idea: `--seed` is the probe's training seed
            if self.noise_seed not in (None, self.seed):
                raise ValueError(f"`seed` {self.seed} and `noise_seed` {self.noise_seed}: give --noise_seed only.")
            warnings.warn("`seed` of extract is deprecated and will be removed: it is `noise_seed` (--noise_seed), "
                          "while `probe`'s --seed seeds its training.", FutureWarning, stacklevel=3)
            self.noise_seed, self.seed = self.seed, None
        if self.noise_seed is None:
            self.noise_seed = 0
        self.slices  # checks the slice flags

    @property
    def slices(self) -> SliceSelection:
        """Which slices of DICOM / NIfTI files are images (`--slice_axis`, `--slice_range`, `--keep_empty_slices`;
        those the pretrained model read, `inherit_pretrained_slices`, once its folder is loaded)."""
        return slice_selection(2 if self.slice_axis is None else self.slice_axis, self.slice_range,
                               bool(self.keep_empty_slices))
