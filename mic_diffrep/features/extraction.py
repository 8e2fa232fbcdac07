"""Feature extraction over an image folder, sharded across processes, into a feature cache.

    accelerate launch training/extract_features.py --pretrained runs/pretrain --data_dir DIR --output feats.safetensors
    torchrun --standalone --nproc_per_node 2 training/extract_features.py ...   # 2 CPU processes

Each process extracts a contiguous shard of the images; features are gathered back in input order and written by
the main process. Noise seeds are fixed per image before sharding, so the result does not depend on the number of
processes or the batch size.

```python
>>> from mic_diffrep.features import ExtractionArguments, extract_folder
>>> extract_folder(ExtractionArguments(pretrained="runs/pretrain", data_dir="DIR", output="f.safetensors"))  # doctest: +SKIP

```
"""

import logging
import os
from dataclasses import replace
from typing import Dict, Tuple

import torch

from ..data import decode_images, load_image_folder, select_splits
from ..data.medical import inherit_slice_settings
from ..utils import create_accelerator, model_source, precision_dtype, prepare_output_file
from .arguments import ExtractionArguments
from .cache import save_features
from .extractors import FeatureExtractor, load_feature_extractor


logger = logging.getLogger(__name__)


def noise_seeds_for(num_images: int, noise: str, seed: int) -> torch.Tensor:
    """Per-image noise seeds: all equal to `seed` for `"fixed"`, drawn from `seed` for `"per_image"`."""
    if noise == "fixed":
        return torch.full((num_images,), seed, dtype=torch.long)
    if noise == "per_image":
        return torch.randint(0, 2**62, (num_images,), generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"`noise` must be 'fixed' or 'per_image', got {noise!r}.")


def extract_sharded(extractor: FeatureExtractor, pixels: torch.Tensor, args, accelerator,
                    noise_seeds: torch.Tensor) -> Dict[Tuple[str, int], torch.Tensor]:
    """`extractor.extract` over `pixels`, split across the processes of `accelerator`, gathered in input order."""
    indices = list(range(len(pixels)))
    with accelerator.split_between_processes(indices) as shard:
        shard = torch.as_tensor(shard, dtype=torch.long)
        features = extractor.extract(pixels[shard], args, noise_seeds[shard],
                                     show_progress=accelerator.is_local_main_process)
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
    extractor = prepare_extractor(load_feature_extractor(args.pretrained), args, accelerator)
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
    features = extract_sharded(extractor, decoded.pixels, args, accelerator, noise_seeds)
    if accelerator.is_main_process:
        settings = {**extractor.cache_settings(args), "noise": args.noise}
        save_features(args.output, features, settings, image_ids=decoded.paths, labels=decoded.labels,
                      label_names=decoded.label_names, source_model=model_source(args.pretrained))
        logger.info("Wrote features of %d images (%s) to %s", len(decoded), splits, args.output)
    accelerator.wait_for_everyone()
    return features
