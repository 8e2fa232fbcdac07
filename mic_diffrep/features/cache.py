"""Extracted features on disk: one safetensors file with the settings that produced them.

Probes train in seconds on cached features instead of re-running the UNet. A cache records the source model (a
fingerprint of the UNet weights), the extraction settings and the image ids (and the probe adds a fingerprint of the
decoded pixels); `load_features` with the settings you are about to use raises `StaleFeatureCacheError` when any of
them differ, so a cache of another model, other settings or other images is never silently reused. A cache of more
layers or timesteps than asked for serves the ones asked for.

```python
>>> from mic_diffrep import DiffusionFeaturePipeline
>>> from mic_diffrep.features.cache import save_features, load_features
>>> pipe = DiffusionFeaturePipeline.from_pretrained("runs/mic-diffrep/pretrain")  # doctest: +SKIP
>>> paths, settings = ["slice0.jpg", "slice1.jpg"], {"timesteps": [100], "pooling": "avg"}
>>> out = pipe.extract_features(paths, timesteps=[100], pooling="avg")  # doctest: +SKIP
>>> save_features("feats.safetensors", out.features, settings, image_ids=paths)  # doctest: +SKIP
>>> cached = load_features("feats.safetensors", expected_settings=settings)  # doctest: +SKIP
>>> cached.features[("mid_block", 100)].shape  # doctest: +SKIP

```
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, is_dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open

from ..models.mic_diffrep.unet_features import concatenate_features
from ..utils import save_safetensors


FORMAT_VERSION = 2
# Settings a cache holding more of them serves: it returns the ones asked for (each (layer, t) is extracted alone).
SUBSET_SETTINGS = ("layers", "timesteps")


class StaleFeatureCacheError(ValueError):
    """A feature cache made from another model, other settings or other images."""


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's weights and config: two different models never share it, and the same model gets
    the same one in every process. Private config entries (`_name_or_path`, diffusers' `_use_default_values`, a list
    whose order follows string hashing) do not change the model and are left out."""
    config = model.config
    config = asdict(config) if is_dataclass(config) else config.to_dict() if hasattr(config, "to_dict") else dict(config)
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def pixels_fingerprint(pixels: torch.Tensor) -> str:
    """A short hash of decoded images (`DecodedImages.pixels`) with their shape: a cache stays valid only for the
    same pixels, not merely the same file names (a file replaced, or other slices of a volume under the same ids).

    >>> pixels_fingerprint(torch.zeros(2, 1, 4, 4, dtype=torch.uint8)) == pixels_fingerprint(torch.zeros(2, 1, 4, 4))
    False
    """
    digest = hashlib.sha256(f"{tuple(pixels.shape)} {pixels.dtype}".encode())
    digest.update(pixels.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _serves(cached, wanted) -> bool:
    return isinstance(cached, list) and isinstance(wanted, list) and set(wanted) <= set(cached)


@dataclass
class CachedFeatures:
    """Features read back from a cache file."""

    features: Dict[Tuple[str, int], torch.Tensor]
    layers: List[str]
    timesteps: List[int]
    image_ids: List[str]
    labels: Optional[torch.Tensor]
    label_names: Optional[List[str]]
    settings: dict
    source_model: Optional[str]

    def concatenate(self, layers: Optional[Sequence[str]] = None, timesteps: Optional[Sequence[int]] = None):
        """The MSFA input of the cached features (see `concatenate_features`)."""
        return concatenate_features(self.features, self.layers if layers is None else layers,
                                    self.timesteps if timesteps is None else timesteps)


def _key(layer: str, timestep: int) -> str:
    return f"{layer}@t={timestep}"


def save_features(path: str, features: Dict[Tuple[str, int], torch.Tensor], settings: dict,
                  image_ids: Sequence[str], labels=None, label_names=None, source_model: Optional[str] = None) -> None:
    """Writes `features` (`{(layer, t): (N, D)}`, e.g. `DiffusionFeaturesOutput.features`) to `path` atomically, with
    the settings that made them and the image ids."""
    features = {(str(layer), int(t)): tensor for (layer, t), tensor in features.items()}  # numpy ints too
    layers = list(dict.fromkeys(layer for layer, _ in features))
    timesteps = list(dict.fromkeys(t for _, t in features))
    missing = [(layer, t) for t in timesteps for layer in layers if (layer, t) not in features]
    if missing:  # a cache is a layer x timestep grid: `load_features` reads every pair
        raise ValueError(f"`features` must hold every layer at every timestep (a layer x timestep grid); missing "
                         f"{missing}.")
    tensors = {_key(layer, t): tensor.contiguous() for (layer, t), tensor in features.items()}
    num_images = len(next(iter(tensors.values())))
    if image_ids is None or len(image_ids) != num_images:
        raise ValueError(f"`image_ids` must name the {num_images} feature rows (one id per image), got "
                         f"{'None' if image_ids is None else len(image_ids)}.")
    if labels is not None:
        tensors["labels"] = torch.as_tensor(labels, dtype=torch.long)
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "settings": json.dumps(settings, sort_keys=True),
        "layers": json.dumps(layers),
        "timesteps": json.dumps(timesteps),
        "image_ids": json.dumps(list(image_ids)),
        "label_names": json.dumps(label_names),
        "source_model": json.dumps(source_model),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_safetensors(tensors, path, metadata=metadata)


def load_features(path: str, expected_settings: Optional[dict] = None,
                  expected_image_ids: Optional[Sequence[str]] = None) -> CachedFeatures:
    """Reads a feature cache. Raises `StaleFeatureCacheError` if it does not match the expected settings or ids; a
    cache of more layers or timesteps than `expected_settings` names returns those it names."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Feature cache {path!r} does not exist.")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if "settings" not in metadata:
                raise StaleFeatureCacheError(f"{path} is not a mic-diffrep feature cache (no settings in its "
                                             f"metadata).")
            settings = json.loads(metadata["settings"])
            layers, timesteps = json.loads(metadata["layers"]), json.loads(metadata["timesteps"])
            features = {(layer, t): f.get_tensor(_key(layer, t)) for t in timesteps for layer in layers}
            labels = f.get_tensor("labels") if "labels" in f.keys() else None
        image_ids = json.loads(metadata["image_ids"])
    except StaleFeatureCacheError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:  # truncated, overwritten
        raise StaleFeatureCacheError(f"Feature cache {path} cannot be read, it is damaged ({type(error).__name__}: "
                                     f"{error}).") from None
    if expected_settings is not None:
        expected = json.loads(json.dumps(expected_settings, sort_keys=True))
        differences = {k: (settings.get(k), v) for k, v in expected.items()
                       if settings.get(k) != v and not (k in SUBSET_SETTINGS and _serves(settings.get(k), v))}
        if differences:
            details = "; ".join(f"{k}: cache has {old!r}, wanted {new!r}" for k, (old, new) in differences.items())
            raise StaleFeatureCacheError(f"Feature cache {path} is stale ({details}).")
        layers, timesteps = expected.get("layers", layers), expected.get("timesteps", timesteps)
        features = {(layer, t): features[(layer, t)] for t in timesteps for layer in layers}
        settings = {**settings, "layers": layers, "timesteps": timesteps}
    if expected_image_ids is not None and list(expected_image_ids) != image_ids:
        raise StaleFeatureCacheError(
            f"Feature cache {path} was extracted from other images ({len(image_ids)} cached, "
            f"{len(expected_image_ids)} asked for, or in another order)."
        )
    return CachedFeatures(
        features=features, layers=layers, timesteps=timesteps, image_ids=image_ids, labels=labels,
        label_names=json.loads(metadata["label_names"]), settings=settings,
        source_model=json.loads(metadata["source_model"]),
    )
