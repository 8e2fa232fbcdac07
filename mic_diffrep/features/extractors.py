"""Frozen feature extractors behind one interface: the diffusion pipeline, the baselines' encoders, a local CLIP.

The probe, the feature cache and the benchmarks talk to any of them through `FeatureExtractor`, so none of them
needs to know which kind of model it holds:

- `DiffusionFeatureExtractor`: pooled UNet block activations of noised images (`DiffusionFeaturePipeline`), one
  feature per `(layer, timestep)`; it can be exported as a `MicDiffRepForImageClassification`.
- `EncoderFeatureExtractor`: the pooled output of a baseline's frozen encoder (MoCo v2 / BYOL ResNet: its last
  feature map, pooled as the UNet blocks are; MAE: its patch tokens on their grid, pooled the same way), one layer
  `"encoder"`; noise levels do not apply and features are keyed `t=0`.
- `ClipFeatureExtractor`: a local `CLIPVisionModel` folder (nothing is downloaded), fed grey images as RGB.

```python
>>> from mic_diffrep.data import decode_images
>>> from mic_diffrep.features import FeatureArguments, load_feature_extractor
>>> extractor = load_feature_extractor("runs/mic-diffrep/pretrain")  # doctest: +SKIP
>>> decoded = decode_images(["slice0.jpg", "slice1.jpg"], extractor.preprocessing)  # doctest: +SKIP
>>> args = extractor.resolve(FeatureArguments(timesteps=[10, 100]))  # doctest: +SKIP
>>> features = extractor.extract(decoded.pixels, args)  # {(layer, t): (N, C)}  # doctest: +SKIP

```
"""

import json
import logging
import os
from dataclasses import replace
from typing import Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPVisionModel

from ..data.medical import SLICE_SETTINGS
from ..models.baselines import is_baseline_dir, load_baseline
from ..models.baselines.mae import MAE
from ..models.mic_diffrep import MicDiffRepConfig, MicDiffRepForImageClassification
from ..models.mic_diffrep.preprocessing import ImagePreprocessing, pixels_to_model_input
from ..models.mic_diffrep.unet_features import check_layers, pool_features
from ..pipelines import DiffusionFeaturePipeline
from ..utils import SUMMARY_FILE, error_summary, model_folder, not_a_pipeline, progress_interval
from .arguments import FeatureArguments
from .cache import model_fingerprint


logger = logging.getLogger(__name__)


Features = Dict[Tuple[str, int], torch.Tensor]


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the probe, the feature cache and the benchmarks need from a frozen model."""

    name: str  # "micdiffrep", "baseline-mocov2", "baseline-byol", "baseline-mae", "baseline-clip"
    source: Optional[str]  # the folder it was loaded from
    preprocessing: ImagePreprocessing
    slice_settings: Dict  # the slices of NIfTI volumes its pretraining read ({} when its folder does not say)
    layer_names: List[str]
    exportable: bool  # whether `classifier` makes a transformers model folder (baselines and CLIP: scored only)

    def to(self, *args, **kwargs) -> "FeatureExtractor":
        """Moves or casts the model like `nn.Module.to` (`.to(torch.bfloat16)` extracts in bf16)."""

    @property
    def dtype(self) -> torch.dtype:
        """The precision the model is in (what `to` last cast it to)."""

    def resolve(self, args: FeatureArguments) -> FeatureArguments:
        """`args` with the layers and timesteps this extractor will use filled in and checked."""

    def cache_settings(self, args: FeatureArguments) -> dict:
        """Everything that determines the features (model fingerprint and resolved `args`): the cache's key."""

    def extract(self, pixels: torch.Tensor, args: FeatureArguments, noise_seeds: Optional[torch.Tensor] = None,
                show_progress: bool = True) -> Features:
        """Features `{(layer, t): (N, D) float32}` of uint8 `(N, 1, R, R)` pixels (from `decode_images`); one noise
        seed per image (default: `args.noise_seed` for all, the classifier's fixed noise)."""

    def classifier(self, head: nn.Module, mean: torch.Tensor, std: torch.Tensor, layers: Sequence[str],
                   timesteps: Sequence[int], label_names: Sequence[str], args: FeatureArguments,
                   hidden_size: int, dropout: float) -> Optional[MicDiffRepForImageClassification]:
        """A transformers classifier holding the frozen model and a trained MSFA head, or `None` when this kind
        of extractor cannot be exported (baselines and CLIP are scored only)."""


class DiffusionFeatureExtractor:
    """`DiffusionFeaturePipeline.extract_features` behind the `FeatureExtractor` interface."""

    name = "micdiffrep"
    exportable = True

    def __init__(self, pipeline: DiffusionFeaturePipeline, source: Optional[str] = None):
        self.pipeline = pipeline
        self.source = source

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "DiffusionFeatureExtractor":
        """The pipeline folder at `path`; `kwargs` go to `DiffusionFeaturePipeline.from_pretrained` (e.g.
        `dtype=torch.bfloat16`)."""
        return cls(DiffusionFeaturePipeline.from_pretrained(path, **kwargs), source=path)

    @property
    def preprocessing(self) -> ImagePreprocessing:
        return self.pipeline.preprocessing

    @property
    def slice_settings(self) -> Dict:
        return self.pipeline.slice_settings

    @property
    def layer_names(self) -> List[str]:
        return self.pipeline.layer_names

    def to(self, *args, **kwargs) -> "DiffusionFeatureExtractor":
        self.pipeline.to(*args, **kwargs)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.unet.dtype

    def resolve(self, args: FeatureArguments) -> FeatureArguments:
        args = replace(args, layers=list(args.layers or self.layer_names), timesteps=[int(t) for t in args.timesteps])
        self.pipeline.check_inputs(args.timesteps, args.layers, args.pooling, args.num_noise_samples, args.batch_size)
        return args

    def cache_settings(self, args: FeatureArguments) -> dict:
        # A flip-averaged mirror image is noised with its image's own noise; the key makes caches of the earlier
        # read-out (the noised image mirrored, noise and all) stale.
        return {"model_fingerprint": model_fingerprint(self.pipeline.unet), **_settings(self.preprocessing, args),
                "timesteps": list(args.timesteps), "num_noise_samples": args.num_noise_samples,
                "noise_seed": args.noise_seed, **({"mirror_noise": "shared"} if args.flip_average else {})}

    def extract(self, pixels: torch.Tensor, args: FeatureArguments, noise_seeds: Optional[torch.Tensor] = None,
                show_progress: bool = True) -> Features:
        if noise_seeds is None:
            noise_seeds = torch.full((len(pixels),), args.noise_seed, dtype=torch.long)
        self.pipeline.set_progress_bar_config(**{**getattr(self.pipeline, "_progress_bar_config", {}),
                                                 "disable": not show_progress})  # the caller's other settings kept
        return self.pipeline.extract_features(
            pixels, args.timesteps, args.layers, pooling=args.pooling, pooling_grid_size=args.pooling_grid_size,
            num_noise_samples=args.num_noise_samples, flip_average=args.flip_average, noise_seeds=noise_seeds,
            batch_size=args.batch_size, preprocessed=True).features

    def classifier(self, head, mean, std, layers, timesteps, label_names, args, hidden_size, dropout):
        pipeline = self.pipeline
        schedule = pipeline.scheduler.config
        config = MicDiffRepConfig(
            unet_config=dict(pipeline.unet.config), num_train_timesteps=schedule.num_train_timesteps,
            beta_schedule=schedule.beta_schedule, beta_start=schedule.beta_start, beta_end=schedule.beta_end,
            prediction_type=schedule.prediction_type, layers=list(layers), timesteps=list(timesteps),
            pooling=args.pooling, pooling_grid_size=args.pooling_grid_size, num_noise_samples=args.num_noise_samples,
            flip_average=args.flip_average, noise_seed=args.noise_seed, hidden_size=hidden_size, classifier_dropout=dropout,
            mixed_precision={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(pipeline.unet.dtype, "no"),
            resize_mode=pipeline.config.resize_mode, intensity_window=pipeline.config.intensity_window,
            num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
        )
        model = MicDiffRepForImageClassification(config)
        model.unet.load_state_dict({k: v.float() for k, v in pipeline.unet.state_dict().items()})
        if config.mixed_precision == "bf16":
            # As `from_pretrained(dtype=torch.bfloat16)` loads it: saved so, its config's `dtype` says bfloat16 and
            # plain `from_pretrained` (dtype "auto") runs the UNet in the precision the head was trained on.
            model.unet.to(torch.bfloat16)
        model.head.load_state_dict(head.state_dict())
        model.feature_mean.copy_(mean)
        model.feature_std.copy_(std)
        return model.eval()


class EncoderFeatureExtractor:
    """The pooled output of a baseline's frozen encoder (`training/pretrain_baseline.py` folders): one layer,
    `"encoder"`; noise levels do not apply, so features are keyed with timestep 0."""

    layer_names = ["encoder"]
    exportable = False

    def __init__(self, model: nn.Module, source: Optional[str] = None):
        self.model = model.eval()
        self.source = source
        self.name = f"baseline-{model.config.method}"
        config = model.config
        self.preprocessing = ImagePreprocessing(config.resolution, config.resize_mode, config.intensity_window)
        self.slice_settings = {name: getattr(config, name) for name in SLICE_SETTINGS}

    @classmethod
    def from_pretrained(cls, path: str) -> "EncoderFeatureExtractor":
        return cls(load_baseline(path), source=path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, *args, **kwargs) -> "EncoderFeatureExtractor":
        self.model.to(*args, **kwargs)
        return self

    def resolve(self, args: FeatureArguments) -> FeatureArguments:
        layers = list(args.layers or self.layer_names)
        check_layers(layers, self.layer_names)
        return replace(args, layers=layers, timesteps=[0], num_noise_samples=1)

    def cache_settings(self, args: FeatureArguments) -> dict:
        return {"model_fingerprint": model_fingerprint(self.model), **_settings(self.preprocessing, args)}

    @torch.no_grad()
    def encode(self, images: torch.Tensor, args: FeatureArguments) -> torch.Tensor:
        """Pooled encoder output `(B, D)` of model inputs in [-1, 1] (one view; `extract` adds the mirrored one)."""
        if isinstance(self.model, MAE):
            vit = self.model.mae.vit
            side = vit.config.image_size // vit.config.patch_size
            # Every patch kept, in grid order: ViTMAE orders patches by `noise`, which is random unless passed (and
            # then makes features depend on torch's global generator and draws from it).
            order = torch.arange(side * side, dtype=torch.float32, device=images.device).expand(len(images), -1)
            ratio, vit.config.mask_ratio = vit.config.mask_ratio, 0.0
            try:
                tokens = vit(pixel_values=images, noise=order).last_hidden_state[:, 1:]
            finally:
                vit.config.mask_ratio = ratio
            feature_map = tokens.transpose(1, 2).reshape(len(images), -1, side, side)
        else:
            feature_map = self.model.encoder.feature_map(images)
        return pool_features(feature_map, args.pooling, args.pooling_grid_size)

    def extract(self, pixels: torch.Tensor, args: FeatureArguments, noise_seeds: Optional[torch.Tensor] = None,
                show_progress: bool = True) -> Features:
        chunks = []
        starts = range(0, len(pixels), args.batch_size)
        for start in tqdm(starts, desc="Extracting features", disable=not show_progress, mininterval=progress_interval()):
            batch = pixels_to_model_input(pixels[start : start + args.batch_size]).to(self.device, self.dtype)
            features = self.encode(batch, args).float()
            if args.flip_average:
                features = (features + self.encode(batch.flip(-1), args).float()) / 2
            chunks.append(features.cpu())
        return {("encoder", 0): torch.cat(chunks)}

    def classifier(self, *args, **kwargs) -> None:
        return None


class ClipFeatureExtractor(EncoderFeatureExtractor):
    """A local `CLIPVisionModel` (pass a folder you have: nothing is downloaded) as a frozen feature extractor.

    Grey images are repeated to three channels, resized to the model's input size and normalised with CLIP's mean
    and std; the feature is the model's pooled output, whatever `pooling` asks (as noise levels, it does not apply).
    """

    MEAN = (0.48145466, 0.4578275, 0.40821073)
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, model: CLIPVisionModel, source: Optional[str] = None, resolution: int = 112):
        self.model = model.eval()
        self.source = source
        self.name = "baseline-clip"
        self.preprocessing = ImagePreprocessing(resolution)
        self.slice_settings = {}

    @classmethod
    def from_pretrained(cls, path: str, resolution: int = 112) -> "ClipFeatureExtractor":
        if not os.path.isfile(os.path.join(path, "model.safetensors")) and not os.path.isfile(
                os.path.join(path, "model.safetensors.index.json")):  # no pickles: a .bin holds one
            raise ValueError(f"{path}: a CLIP folder is read from model.safetensors only (its pytorch_model.bin is a "
                             f"pickle, not read). If you trust the folder, convert it once: "
                             f"CLIPVisionModel.from_pretrained(folder, use_safetensors=False).save_pretrained(folder).")
        model = CLIPVisionModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
        return cls(model, source=path, resolution=resolution)

    def resolve(self, args: FeatureArguments) -> FeatureArguments:
        return super().resolve(replace(args, pooling="avg"))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, args: FeatureArguments) -> torch.Tensor:
        size = self.model.config.image_size
        x = F.interpolate((images.float() + 1) / 2, size=(size, size), mode="bicubic", align_corners=False)
        x = x.clamp(0, 1).repeat(1, 3, 1, 1)
        mean = torch.tensor(self.MEAN, device=x.device)[None, :, None, None]
        std = torch.tensor(self.STD, device=x.device)[None, :, None, None]
        return self.model(pixel_values=((x - mean) / std).to(self.dtype)).pooler_output


def _settings(preprocessing: ImagePreprocessing, args: FeatureArguments) -> dict:
    return {"resolution": preprocessing.resolution, "resize_mode": preprocessing.resize_mode,
            "intensity_window": preprocessing.intensity_window, "layers": list(args.layers),
            "timesteps": list(args.timesteps), "pooling": args.pooling,
            "pooling_grid_size": args.pooling_grid_size if args.pooling == "grid" else None,
            **({"flip_average": True} if args.flip_average else {}),
            "mixed_precision": args.mixed_precision or "no"}


def is_clip_vision_dir(path: str) -> bool:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file, encoding="utf-8") as f:
        return json.load(f).get("model_type") in ("clip", "clip_vision_model")


def is_pipeline_dir(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, name)) for name in ("model_index.json", "unet", "scheduler"))


def _pretrained_folder(path: str, revision: Optional[str] = None) -> str:
    """The local folder of a pretrained folder or Hub repository id (at `revision`: `model_folder`)."""
    return model_folder(path, "Pretrained folder", "the folder a pretraining wrote", revision=revision)


def load_pipeline(path: str, revision: Optional[str] = None) -> DiffusionFeaturePipeline:
    """The `DiffusionFeaturePipeline` in a pretraining output folder (or a Hub repository of one, at `revision`), with
    a clear error for anything else."""
    path = _pretrained_folder(path, revision)
    if is_baseline_dir(path) or is_clip_vision_dir(path):
        raise ValueError(f"{path!r} holds a baseline encoder, not a diffusion pipeline: it extracts features but "
                         f"cannot generate images. Pass the output folder of `mic-diffrep pretrain`.")
    mistaken = not_a_pipeline(path)
    if mistaken:
        raise ValueError(mistaken)
    if not is_pipeline_dir(path):
        missing = [n for n in ("model_index.json", "unet", "scheduler") if not os.path.exists(os.path.join(path, n))]
        raise ValueError(f"{path!r} is not a pretrained pipeline folder (missing {', '.join(missing)}); pass the "
                         f"output folder of `mic-diffrep pretrain` / training/pretrain.py.")
    try:
        return DiffusionFeaturePipeline.from_pretrained(path)
    except (OSError, SafetensorError) as error:  # a missing, truncated or broken file of the folder (or a `.bin`)
        raise ValueError(f"Pretrained folder {path!r} cannot be loaded ({error_summary(error)}); is it complete? "
                         f"Its weights are read as safetensors only.") from error


def _warn_if_interrupted(path: str) -> None:
    """Warns when the pretraining that wrote `path` was interrupted (Ctrl-C, SIGTERM): its weights are those saved
    before it stopped, and `mic-diffrep run` would not probe them."""
    try:
        with open(os.path.join(path, SUMMARY_FILE), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return
    if isinstance(summary, dict) and summary.get("stop_reason") == "interrupted":
        logger.warning("%s is from an interrupted pretraining (stopped at step %s; the weights are those saved "
                       "before): continue it with --resume_from_checkpoint latest to use the finished model.", path,
                       summary.get("global_step"))


def load_feature_extractor(path: str, resolution: Optional[int] = None,
                           revision: Optional[str] = None) -> FeatureExtractor:
    """The frozen feature extractor in `path`: a pretrained diffusion pipeline, a baseline's folder (from
    `training/pretrain_baseline.py`), or a local `CLIPVisionModel` (fed `resolution` px images, default 112); a
    folder, or a Hub repository id of one (at `revision`). The others read images at the resolution they were
    pretrained at: another `resolution` is refused, not ignored. Its `folder` is the local folder it was read from."""
    source, path = path, _pretrained_folder(path, revision)
    _warn_if_interrupted(path)
    if is_clip_vision_dir(path):
        extractor = ClipFeatureExtractor.from_pretrained(path, resolution=resolution or 112)
    else:
        extractor = EncoderFeatureExtractor.from_pretrained(path) if is_baseline_dir(path) else \
            DiffusionFeatureExtractor(load_pipeline(path), source=source)
        if resolution is not None and resolution != extractor.preprocessing.resolution:
            raise ValueError(f"--resolution {resolution}: {path} was pretrained at "
                             f"{extractor.preprocessing.resolution} px and reads images at that size (--resolution "
                             f"sets a CLIP model's input size only).")
    extractor.folder = path
    return extractor
