"""The `mic-diffrep` command: one subcommand per step of the method.

    mic-diffrep run                                   # the whole method on the bundled MRI sample
    mic-diffrep pretrain --train_data_dir DIR --output_dir OUT
    mic-diffrep extract --pretrained OUT --data_dir DIR --output features.safetensors
    mic-diffrep generate --pretrained OUT --num_images 16 --output samples.png

`mic-diffrep SUBCOMMAND --help` explains every flag.
"""

import argparse
import json
import logging
import os
import sys
from typing import List, Optional


SAMPLE_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_data", "brain-tumor-mri")

# What `mic-diffrep run` does when given no flags: the bundled sample, 64 px, bf16 where it is fast.
RUN_DEFAULTS = {
    "data_dir": SAMPLE_DATA_DIR,
    "output_dir": "runs/mic-diffrep",
    "resolution": 64,
    "model_config_name_or_path": "default",
    "mixed_precision": "bf16",
    "pretrain_epochs": 40,
    "pretrain_batch_size": 32,
    "learning_rate": 1e-4,
    "num_samples": 16,
    "sampling_steps": 250,
    "seed": 0,
}


def _pretrain(args: argparse.Namespace) -> None:
    from .pretraining import main

    main(args)


def _extract(args: argparse.Namespace) -> None:
    from .feature_extraction import main

    main(args)


def _generate(args: argparse.Namespace) -> None:
    import torch
    from diffusers import DDIMScheduler

    from .pipelines import DiffusionFeaturePipeline, save_image_grid

    pipe = DiffusionFeaturePipeline.from_pretrained(args.pretrained)
    if args.scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    images = pipe(
        batch_size=args.num_images, generator=torch.Generator().manual_seed(args.seed),
        num_inference_steps=args.num_inference_steps, output_type="np", mixed_precision=args.mixed_precision,
    ).images
    save_image_grid(images, args.output)
    print(f"Saved {args.num_images} samples to {args.output}")


def _run(args: argparse.Namespace) -> None:
    """The whole method in one go (grows with the pipeline): pretraining, then a sample grid."""
    from .pretraining import add_pretraining_args, main as pretrain

    config = dict(RUN_DEFAULTS)
    if args.config:
        config.update(_load_config(args.config))
    config.update({k: v for k, v in vars(args).items() if v is not None and k in RUN_DEFAULTS})
    output_dir = config["output_dir"]
    pretrain_dir = os.path.join(output_dir, "pretrain")
    pretrain_argv = [
        "--train_data_dir", config["data_dir"], "--output_dir", pretrain_dir,
        "--resolution", str(config["resolution"]), "--model_config_name_or_path", config["model_config_name_or_path"],
        "--num_epochs", str(config["pretrain_epochs"]), "--train_batch_size", str(config["pretrain_batch_size"]),
        "--learning_rate", str(config["learning_rate"]), "--mixed_precision", config["mixed_precision"],
        "--save_images_epochs", str(config["pretrain_epochs"]), "--save_model_epochs", str(config["pretrain_epochs"]),
        "--eval_batch_size", str(config["num_samples"]), "--ddpm_num_inference_steps", str(config["sampling_steps"]),
        "--seed", str(config["seed"]), "--checkpointing_steps", "100000",
    ]
    pretrain_args = add_pretraining_args(argparse.ArgumentParser()).parse_args(pretrain_argv)
    summary = pretrain(pretrain_args)
    report = {"config": config, "pretraining": summary}
    with open(os.path.join(output_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"Pretrained pipeline: {pretrain_dir}")
    print(f"Samples: {os.path.join(pretrain_dir, 'samples')}")
    print(f"Report: {os.path.join(output_dir, 'report.json')}")


def _load_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path!r} does not exist.")
    with open(path, encoding="utf-8") as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            config = yaml.safe_load(f)
        else:
            config = json.load(f)
    unknown = sorted(set(config) - set(RUN_DEFAULTS))
    if unknown:
        raise ValueError(f"--config {path}: unknown key(s) {unknown}; known keys are {sorted(RUN_DEFAULTS)}.")
    return config


def build_parser() -> argparse.ArgumentParser:
    from .feature_extraction import add_extraction_args
    from .pretraining import add_pretraining_args
    from .utils import MIXED_PRECISION_CHOICES

    parser = argparse.ArgumentParser(prog="mic-diffrep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    run = subparsers.add_parser("run", help="The whole method on a dataset (default: the bundled MRI sample).",
                                description="Pretrain -> sample grid -> report, in one go.")
    run.add_argument("--data_dir", type=str, default=None,
                     help="Image folder (Training/Testing/<class>/ or train/val/test layouts). Default: the bundled "
                          "sample of the Brain Tumor MRI dataset.")
    run.add_argument("--output_dir", type=str, default=None, help="Where everything goes (default runs/mic-diffrep).")
    run.add_argument("--config", type=str, default=None,
                     help=f"YAML/JSON preset with any of the keys {sorted(RUN_DEFAULTS)}; flags override it.")
    run.add_argument("--resolution", type=int, default=None, help="Image size (default 64).")
    run.add_argument("--model_config_name_or_path", type=str, default=None, help="UNet preset or config (default 'default').")
    run.add_argument("--mixed_precision", type=str, default=None, choices=MIXED_PRECISION_CHOICES,
                     help="Precision of pretraining and sampling (default bf16).")
    run.add_argument("--pretrain_epochs", type=int, default=None, help="Pretraining epochs (default 40).")
    run.add_argument("--pretrain_batch_size", type=int, default=None, help="Pretraining batch size (default 32).")
    run.add_argument("--learning_rate", type=float, default=None, help="Pretraining learning rate (default 1e-4).")
    run.add_argument("--num_samples", type=int, default=None, help="Images in the sample grid (default 16).")
    run.add_argument("--sampling_steps", type=int, default=None, help="DDPM steps for the sample grid (default 250).")
    run.add_argument("--seed", type=int, default=None, help="Seed (default 0).")
    run.set_defaults(func=_run)

    pretrain = subparsers.add_parser("pretrain", help="DDPM pretraining (same flags as training/pretrain.py).",
                                     description="DDPM pretraining of a UNet2DModel on unlabelled images.")
    add_pretraining_args(pretrain)
    pretrain.set_defaults(func=_pretrain)

    extract = subparsers.add_parser("extract", help="Extract diffusion features of an image folder into a cache file.",
                                    description="Extract pooled UNet block features (same flags as "
                                                "training/extract_features.py).")
    add_extraction_args(extract)
    extract.set_defaults(func=_extract)

    generate = subparsers.add_parser("generate", help="Generate images with a pretrained pipeline.",
                                     description="Generate images and save them as one PNG grid.")
    generate.add_argument("--pretrained", type=str, required=True, help="Pretrained pipeline folder.")
    generate.add_argument("--num_images", type=int, default=16, help="How many images.")
    generate.add_argument("--num_inference_steps", type=int, default=1000, help="Denoising steps (paper: 1000 DDPM).")
    generate.add_argument("--scheduler", type=str, default="ddpm", choices=["ddpm", "ddim"],
                          help="ddpm (the pipeline's own) or ddim (good with ~50 steps).")
    generate.add_argument("--mixed_precision", type=str, default=None, choices=MIXED_PRECISION_CHOICES,
                          help="'bf16' autocasts the UNet.")
    generate.add_argument("--seed", type=int, default=0, help="Seed.")
    generate.add_argument("--output", type=str, default="samples.png", help="PNG file to write.")
    generate.set_defaults(func=_generate)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"mic-diffrep {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
