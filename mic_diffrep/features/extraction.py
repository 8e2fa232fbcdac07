"""Feature extraction over an image folder, sharded across processes, into a feature cache.

    accelerate launch training/extract_features.py --pretrained runs/pretrain --data_dir DIR --output feats.safetensors
    torchrun --standalone --nproc_per_node 2 training/extract_features.py ...   # 2 CPU processes

Each process extracts a contiguous shard of the images; features are gathered back in input order and written by
the main process. Noise seeds are fixed per image before sharding, so the result does not depend on the number of
processes or the batch size. Parts of `PART_SIZE` images are saved as they are extracted (`OUTPUT.parts/`), so that a
stopped extraction continues from them.

```python
>>> from mic_diffrep.features import ExtractionArguments, extract_folder
>>> extract_folder(ExtractionArguments(pretrained="runs/pretrain", data_dir="DIR", output="f.safetensors"))  # doctest: +SKIP

```
"""

import hashlib
import json
import logging
import os
import shutil
from dataclasses import replace
from typing import Dict, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..data import decode_images, load_image_folder, select_splits
from ..data.medical import inherit_slice_settings
from ..utils import (create_accelerator, model_source, precision_dtype, prepare_output_file, progress_interval,
                     save_safetensors)
from .arguments import ExtractionArguments
from .cache import pixels_fingerprint, save_features
from .extractors import FeatureExtractor, load_feature_extractor


logger = logging.getLogger(__name__)


def noise_seeds_for(num_images: int, noise: str, seed: int) -> torch.Tensor:
    """Per-image noise seeds: all equal to `seed` for `"fixed"`, drawn from `seed` for `"per_image"`."""
    if noise == "fixed":
        return torch.full((num_images,), seed, dtype=torch.long)
    if noise == "per_image":
        return torch.randint(0, 2**62, (num_images,), generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"`noise` must be 'fixed' or 'per_image', got {noise!r}.")


# Images per part of a resumable extraction (rounded down to whole batches): a part is saved once extracted, and a
# run stopped by then continues from the parts saved.
PART_SIZE = 1024


def extract_sharded(extractor: FeatureExtractor, pixels: torch.Tensor, args, accelerator, noise_seeds: torch.Tensor,
                    parts_dir: Optional[str] = None, settings: Optional[dict] = None
                    ) -> Dict[Tuple[str, int], torch.Tensor]:
    """`extractor.extract` over `pixels`, split across the processes of `accelerator`, gathered in input order.

    With `parts_dir`, every `PART_SIZE` images extracted are saved there, under a key of `settings` (what determines
    the features), the pixels and the noise seeds; a run stopped by Ctrl-C, a crash or a lost machine continues from
    the parts of the same key, with the same features. The caller removes the folder (`remove_parts`) once the
    whole is saved."""
    features, shard = _extract_parts(extractor, pixels, args, accelerator, noise_seeds, parts_dir, settings)
    if accelerator.num_processes == 1:
        return features
    sizes = accelerator.gather(torch.tensor([len(shard)], device=accelerator.device)).cpu().tolist()
    longest = max(sizes)
    gathered_features = {}
    for key, tensor in features.items():
        padded = torch.zeros((longest, tensor.shape[1]), dtype=tensor.dtype)
        padded[: len(tensor)] = tensor
        gathered = accelerator.gather(padded.to(accelerator.device)).cpu().view(len(sizes), longest, -1)
        gathered_features[key] = torch.cat([gathered[rank, :size] for rank, size in enumerate(sizes)])
    return gathered_features


def _parts_key(settings: Optional[dict], pixels: torch.Tensor, noise_seeds: torch.Tensor) -> str:
    digest = hashlib.sha256(json.dumps(settings or {}, sort_keys=True, default=str).encode())
    digest.update(pixels_fingerprint(pixels).encode())
    digest.update(noise_seeds.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _extract_parts(extractor, pixels, args, accelerator, noise_seeds, parts_dir, settings):
    """This process's share of the images, in parts of whole batches with `parts_dir` (each loaded where a part of
    the same key was saved, else extracted and saved), else at once; returns their features and the images'
    indices."""
    with accelerator.split_between_processes(list(range(len(pixels)))) as shard:
        shard = torch.as_tensor(shard, dtype=torch.long)
    if not len(shard):  # fewer images than processes: empty features of the right widths for the gather
        widths = extractor.extract(pixels[:1], args, noise_seeds[:1], show_progress=False)
        return {name: value[:0] for name, value in widths.items()}, shard
    if parts_dir is None:
        return extractor.extract(pixels[shard], args, noise_seeds[shard],
                                 show_progress=accelerator.is_local_main_process), shard
    key = _parts_key(settings, pixels, noise_seeds)
    batch_size = max(getattr(args, "batch_size", 1) or 1, 1)
    size = max(batch_size, PART_SIZE // batch_size * batch_size)
    first, last = int(shard[0]), int(shard[-1]) + 1  # a contiguous share
    parts = [(start, min(start + size, last)) for start in range(first, last, size)]
    os.makedirs(parts_dir, exist_ok=True)
    paths = {part: os.path.join(parts_dir, f"part-{part[0]:09d}-{part[1]:09d}.safetensors") for part in parts}
    saved = [part for part in parts if _part_key(paths[part]) == key]
    if saved and accelerator.is_local_main_process:
        logger.info("Continuing a stopped extraction: %d of this process's %d parts are saved in %s", len(saved),
                    len(parts), parts_dir)
    features = []
    with tqdm(total=last - first, desc="Extracting features", unit="image", delay=2,
              disable=not accelerator.is_local_main_process, mininterval=progress_interval()) as progress:
        for start, stop in parts:
            if (start, stop) in saved:
                with safe_open(paths[(start, stop)], "pt") as f:
                    part = {_feature_key(name): f.get_tensor(name) for name in f.keys()}
            else:
                try:
                    part = extractor.extract(pixels[start:stop], args, noise_seeds[start:stop], show_progress=False)
                except KeyboardInterrupt:
                    if features:
                        logger.warning("The features of %d images are saved in %s: the same command continues "
                                       "from them.", progress.n, parts_dir)
                    raise
                save_safetensors({f"{layer}@{t}": value.contiguous() for (layer, t), value in part.items()},
                                 paths[(start, stop)], metadata={"key": key})
            features.append(part)
            progress.update(stop - start)
    return {name: torch.cat([part[name] for part in features]) for name in features[0]}, shard


def _part_key(path: str) -> Optional[str]:
    """The key of a saved part (`None`: none there, or unreadable, which is extracted again)."""
    try:
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("key")
    except (OSError, SafetensorError):
        return None


def _feature_key(name: str) -> Tuple[str, int]:
    layer, _, t = name.rpartition("@")
    return layer, int(t)


def remove_parts(parts_dir: str) -> None:
    """Removes the saved parts of an extraction whose whole is saved."""
    shutil.rmtree(parts_dir, ignore_errors=True)


def prepare_extractor(extractor: FeatureExtractor, args, accelerator) -> FeatureExtractor:
    """Moves `extractor` to the accelerator's device and to the precision `args.mixed_precision` asks for (see
    `launch_precision`)."""
    extractor.to(accelerator.device)
    return extractor.to(precision_dtype(args.mixed_precision, accelerator.device))


def launch_precision(args, accelerator):
    """`args` with an unset `mixed_precision` taken from the accelerator: that of `accelerate launch
    --mixed_precision` or of the accelerate config ('no' without either), as pretraining takes it."""
    return args if args.mixed_precision is not None else replace(args, mixed_precision=accelerator.mixed_precision)


def inherit_pretrained_slices(args, extractor: FeatureExtractor):
    """`args` (extract's or the probe's) with the slice settings it leaves unset taken from those `extractor`'s
    pretraining read (`inherit_slice_settings`), so that volumes are sliced as they were in pretraining."""
    return replace(args, **inherit_slice_settings(args.slice_axis, args.slice_range, args.keep_empty_slices,
                                                  extractor.slice_settings))


def extract_folder(args: ExtractionArguments) -> Dict[Tuple[str, int], torch.Tensor]:
    """Features of the images of `args.data_dir` into the feature cache `args.output`; returns them."""
    accelerator = create_accelerator()
    args = launch_precision(args, accelerator)
    extractor = prepare_extractor(load_feature_extractor(args.pretrained, revision=args.revision), args, accelerator)
    args = inherit_pretrained_slices(extractor.resolve(args), extractor)
    splits, dataset = select_splits(load_image_folder(args.data_dir), args.splits, "splits")
    # Its folder is made once the model and the images are found (a bad --pretrained or --data_dir leaves none),
    # and before the decoding and extraction, so that an unwritable path costs nothing.
    prepare_output_file(args.output, extensions=(".safetensors",))
    with accelerator.main_process_first():
        decoded = decode_images(
            dataset, extractor.preprocessing, skip_bad_images=args.skip_bad_images,
            num_workers=args.dataloader_num_workers,
            cache_dir=args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.output)), ".cache"),
            show_progress=accelerator.is_local_main_process, slices=args.slices,
        )
    noise_seeds = noise_seeds_for(len(decoded), args.noise, args.noise_seed)
    settings = {**extractor.cache_settings(args), "noise": args.noise}
    parts_dir = f"{args.output}.parts"  # a stopped extraction continues from these
    features = extract_sharded(extractor, decoded.pixels, args, accelerator, noise_seeds, parts_dir, settings)
    if accelerator.is_main_process:
        save_features(args.output, features, settings, image_ids=decoded.paths, labels=decoded.labels,
                      label_names=decoded.label_names, source_model=model_source(args.pretrained))
        remove_parts(parts_dir)
        logger.info("Wrote features of %d images (%s) to %s", len(decoded), splits, args.output)
    accelerator.wait_for_everyone()
    return features
