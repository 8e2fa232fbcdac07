"""Feature extraction over an image folder, sharded across processes, into a feature cache.

    accelerate launch training/extract_features.py --pretrained runs/pretrain --data_dir DIR --output feats.safetensors
    torchrun --standalone --nproc_per_node 2 training/extract_features.py ...   # 2 CPU processes

Each process extracts a contiguous shard of the images; features are gathered back in input order and written by
the main process. Noise seeds are fixed per image before sharding, so the result does not depend on the number of
processes or the batch size.
"""

import argparse
import logging
import os
from typing import List, Optional

import torch

from .utils import MIXED_PRECISION_CHOICES


logger = logging.getLogger(__name__)

DEFAULT_TIMESTEPS = (10, 50, 100, 200, 300, 400, 500, 600)


def add_extraction_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--pretrained", type=str, required=True, help="Pretrained pipeline folder.")
    parser.add_argument("--data_dir", type=str, required=True, help="Image folder (any layout pretraining takes).")
    parser.add_argument("--splits", type=str, nargs="+", default=["all"],
                        help="Splits to extract (train, validation, test, or 'all', the default).")
    parser.add_argument("--output", type=str, required=True, help="Feature cache file to write (.safetensors).")
    add_feature_args(parser)
    parser.add_argument("--noise", type=str, default="fixed", choices=["fixed", "per_image"],
                        help="'fixed': every image gets the same noise (features are a function of the image alone, "
                             "as in the classifier); 'per_image': independent noise per image.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the noise.")
    parser.add_argument("--skip_bad_images", action="store_true", help="Skip unreadable images instead of failing.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Decoded-image cache folder.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="Processes decoding images.")
    return parser


def add_feature_args(parser) -> None:
    """The flags that say which features to extract (shared by extraction and probing)."""
    parser.add_argument("--timesteps", type=int, nargs="+", default=list(DEFAULT_TIMESTEPS),
                        help=f"Timesteps (default {' '.join(map(str, DEFAULT_TIMESTEPS))}).")
    parser.add_argument("--layers", type=str, nargs="+", default=None,
                        help="UNet blocks (down_blocks.i, mid_block, up_blocks.i); default: all of them.")
    parser.add_argument("--pooling", type=str, default="avg", choices=["avg", "avgmax", "grid"],
                        help="Global average, average+max, or an average over a grid of regions.")
    parser.add_argument("--pooling_grid_size", type=int, default=2, help="Grid size for --pooling grid.")
    parser.add_argument("--num_noise_samples", type=int, default=1, help="Noise draws averaged per image.")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per UNet forward.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=MIXED_PRECISION_CHOICES,
                        help="'bf16' autocasts the UNet.")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Extract diffusion features of an image folder into a cache file.")
    return add_extraction_args(parser).parse_args(argv)


def load_pipeline(path: str, resolution: Optional[int] = None):
    """The feature extractor in `path`: a `DiffusionFeaturePipeline`, or a baseline's frozen encoder (a
    `training/pretrain_baseline.py` folder, or a local `CLIPVisionModel`, fed `resolution` px images), with a clear
    error when `path` is none of these."""
    from .baselines import BaselineFeatureExtractor, ClipFeatureExtractor, is_baseline_dir, is_clip_vision_dir
    from .pipelines import DiffusionFeaturePipeline

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--pretrained {path!r} does not exist.")
    if is_baseline_dir(path):
        return BaselineFeatureExtractor.from_pretrained(path)
    if is_clip_vision_dir(path):
        return ClipFeatureExtractor.from_pretrained(path, resolution=resolution or 112)
    missing = [name for name in ("model_index.json", "unet", "scheduler") if not os.path.exists(os.path.join(path, name))]
    if missing:
        raise ValueError(f"--pretrained {path!r} is not a pretrained pipeline folder (missing {', '.join(missing)}); "
                         f"pass the --output_dir of `mic-diffrep pretrain` / training/pretrain.py.")
    return DiffusionFeaturePipeline.from_pretrained(path)


def noise_seeds_for(num_images: int, noise: str, seed: int) -> torch.Tensor:
    """Per-image noise seeds: all equal to `seed` for `"fixed"`, drawn from `seed` for `"per_image"`."""
    if noise == "fixed":
        return torch.full((num_images,), seed, dtype=torch.long)
    if noise == "per_image":
        return torch.randint(0, 2**62, (num_images,), generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"noise must be 'fixed' or 'per_image', got {noise!r}.")


def extract_sharded(pipeline, pixels: torch.Tensor, accelerator, noise_seeds: torch.Tensor, **kwargs):
    """`pipeline.extract_features` over `pixels`, split across the processes of `accelerator`, gathered in order."""
    from .pipelines import DiffusionFeaturesOutput

    indices = list(range(len(pixels)))
    with accelerator.split_between_processes(indices) as shard:
        shard = torch.as_tensor(shard, dtype=torch.long)
        pipeline.set_progress_bar_config(disable=not accelerator.is_local_main_process)
        output = pipeline.extract_features(pixels[shard], noise_seeds=noise_seeds[shard], **kwargs)
    if accelerator.num_processes == 1:
        return output
    sizes = accelerator.gather(torch.tensor([len(shard)], device=accelerator.device)).cpu().tolist()
    longest = max(sizes)
    features = {}
    for key, tensor in output.features.items():
        padded = torch.zeros((longest, tensor.shape[1]), dtype=tensor.dtype)
        padded[: len(tensor)] = tensor
        gathered = accelerator.gather(padded.to(accelerator.device)).cpu().view(len(sizes), longest, -1)
        features[key] = torch.cat([gathered[rank, :size] for rank, size in enumerate(sizes)])
    return DiffusionFeaturesOutput(features=features, layers=output.layers, timesteps=output.timesteps)


def main(args: argparse.Namespace):
    from .data import decode_images, load_image_folder, select_splits
    from .feature_cache import extraction_settings, save_features
    from .utils import create_accelerator, precision_dtype

    accelerator = create_accelerator()
    pipeline = load_pipeline(args.pretrained).to(accelerator.device)
    pipeline.set_progress_bar_config(disable=not accelerator.is_local_main_process)
    splits, dataset = select_splits(load_image_folder(args.data_dir), args.splits, "--splits")
    with accelerator.main_process_first():
        decoded = decode_images(
            dataset, pipeline.preprocessing, skip_bad_images=args.skip_bad_images,
            num_workers=args.dataloader_num_workers,
            cache_dir=args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.output)), ".cache"),
            show_progress=accelerator.is_local_main_process,
        )
    pipeline.to(precision_dtype(args.mixed_precision, accelerator.device))
    kwargs = dict(timesteps=args.timesteps, layers=args.layers, pooling=args.pooling,
                  pooling_grid_size=args.pooling_grid_size, num_noise_samples=args.num_noise_samples,
                  batch_size=args.batch_size)
    output = extract_sharded(pipeline, decoded.pixels, accelerator, noise_seeds_for(len(decoded), args.noise, args.seed),
                             **kwargs)
    if accelerator.is_main_process:
        settings = extraction_settings(pipeline, args.timesteps, output.layers, args.pooling, args.pooling_grid_size,
                                       args.num_noise_samples, {"noise": args.noise, "seed": args.seed},
                                       args.mixed_precision)
        save_features(args.output, output, settings, image_ids=decoded.paths, labels=decoded.labels,
                      label_names=decoded.label_names, source_model=os.path.abspath(args.pretrained))
        logger.info("Wrote features of %d images (%s) to %s", len(decoded), splits, args.output)
    accelerator.wait_for_everyone()
    return output
