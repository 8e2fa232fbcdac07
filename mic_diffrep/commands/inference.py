"""`mic-diffrep evaluate`, `mic-diffrep predict` and `mic-diffrep generate`: using trained models."""

import contextlib
import json
import os
import sys

import PIL.Image
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ..data.medical import add_slice_arguments
from ..features import load_pipeline
from ..inference import evaluate_folder, predict_files
from ..pipelines import save_image_grid
from ..reporting.plotting import plot_confusion_matrix
from ..utils import (MIXED_PRECISION_CHOICES, format_score, json_safe, precision_dtype, output_folder,
                     prepare_output_file, write_json)


def _add_model_args(parser) -> None:
    """The flags `evaluate` and `predict` share: the model folder and how it runs."""
    parser.add_argument("--model", type=str, required=True,
                        help="Model folder (from probe or run), or a Hub repository id of one.")
    parser.add_argument("--revision", type=str, default=None,
                        help="The revision (branch, tag or commit) of --model when it is a Hub repository id "
                             "(default: main).")
    parser.add_argument("--batch_size", type=int, default=16, help="Images per forward (16 is fastest on a CPU).")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=MIXED_PRECISION_CHOICES,
                        help="'bf16' runs the UNet in bf16 (the head stays float32). Default: the precision the "
                             "model's head was trained on (its config's mixed_precision), which reproduces the probe.")
    parser.add_argument("--skip_bad_images", action="store_true", help="Skip unreadable images instead of failing.")
    add_slice_arguments(parser, unset="Default: the model's (the slices its probe was trained on, in its "
                                      "preprocessor_config.json); another --slice_axis than the model's drops its "
                                      "--slice_range.")


def _slices(namespace) -> dict:
    """The slice flags given (the rest are the model's own: `mic_diffrep.inference.model_slices`)."""
    return {name: getattr(namespace, name) for name in ("slice_axis", "slice_range", "keep_empty_slices")
            if getattr(namespace, name) is not None}


def evaluate(namespace) -> dict:
    if namespace.output:
        prepare_output_file(namespace.output, data_folders=(namespace.data_dir,))
    report = evaluate_folder(namespace.model, namespace.data_dir, namespace.splits, namespace.batch_size,
                             namespace.mixed_precision, namespace.skip_bad_images, _slices(namespace),
                             namespace.image_list, namespace.revision)
    if namespace.json:
        print(json.dumps(json_safe(report), indent=2, allow_nan=False))
    else:
        recall = ", ".join(f"{name} {format_score(value)}" for name, value in report["per_class_recall"].items())
        which = f"listed in {namespace.image_list}" if namespace.image_list else ", ".join(report["splits"])
        print(f"{report['num_examples']} images ({which}) of {namespace.data_dir}: accuracy "
              f"{report['accuracy']:.3f}, macro F1 {report['macro_f1']:.3f}; recall: {recall}"
              + (f"; {len(report['skipped_images'])} unreadable images skipped" if report["skipped_images"] else ""))
    if namespace.output:
        write_json(namespace.output, report)
        png = os.path.splitext(namespace.output)[0] + "_confusion_matrix.png"
        plot_confusion_matrix(report["confusion_matrix"], list(report["per_class_recall"]), png,
                              title=f"{os.path.basename(os.path.abspath(namespace.model))} on {namespace.data_dir}")
        print(f"Wrote {namespace.output} and {png}", file=sys.stderr if namespace.json else sys.stdout)
    return report


def predict(namespace) -> list:
    predictions = predict_files(namespace.model, namespace.images, namespace.batch_size, namespace.mixed_precision,
                                namespace.skip_bad_images, _slices(namespace), namespace.revision)
    if namespace.json:
        print(json.dumps(predictions, indent=2))
        return predictions
    for prediction in predictions:
        if prediction["probabilities"] is None:  # --skip_bad_images
            print(f"{prediction['file']}: skipped ({prediction['error']})")
            continue
        ranked = sorted(prediction["probabilities"].items(), key=lambda item: -item[1])
        print(f"{prediction['file']}: " + ", ".join(f"{label} {p:.3f}" for label, p in ranked)
              + (f" ({prediction['warning']})" if prediction.get("warning") else ""))
    return predictions


def generate(namespace) -> None:
    if namespace.num_images < 1:
        raise ValueError(f"--num_images must be at least 1, got {namespace.num_images}.")
    if namespace.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {namespace.batch_size}.")
    if not 0 <= namespace.seed <= 2**63 - namespace.num_images:  # torch seeds are 64-bit signed
        raise ValueError(f"--seed must be in [0, 2**63 - --num_images], got {namespace.seed}.")
    if namespace.num_inference_steps is not None and namespace.num_inference_steps < 1:
        raise ValueError(f"--num_inference_steps must be at least 1, got {namespace.num_inference_steps}.")
    grid = namespace.output if namespace.output or namespace.output_dir else "samples.png"
    if grid:
        image_format = PIL.Image.registered_extensions().get(os.path.splitext(grid)[1].lower())
        if image_format not in PIL.Image.SAVE:  # PIL would fail on it only after sampling
            raise ValueError(f"--output {grid}: give the name of an image file PIL can write (.png, .jpg, .tif, ...).")
        prepare_output_file(grid)
    with output_folder(namespace.output_dir) if namespace.output_dir else contextlib.nullcontext():
        images = _sample(namespace, keep=bool(grid))
    if grid:
        save_image_grid(images, grid)
    last = namespace.seed + len(images) - 1
    seeds = f"seeds {namespace.seed}-{last}" if len(images) > 1 else f"seed {namespace.seed}"
    written = [f"{namespace.output_dir} (seed{namespace.seed:04d}.png, ...)"] if namespace.output_dir else []
    print(f"Saved {len(images)} sample(s) ({seeds}) to {' and '.join(written + ([grid] if grid else []))}")


def _sample(namespace, keep: bool) -> list:
    """`generate`'s images (PIL; `None` for each unless `keep`, for a grid), each drawn with its own seed, in
    batches; with `--output_dir`, each saved there as its batch is done."""
    pipe = load_pipeline(namespace.pretrained, namespace.revision)
    pipe.to(precision_dtype(namespace.mixed_precision))
    if namespace.scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif not isinstance(pipe.scheduler, DDPMScheduler):  # a pipeline saved with another sampler: DDPM, as it says
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    steps = namespace.num_inference_steps or (50 if namespace.scheduler == "ddim" else 1000)
    if steps > pipe.scheduler.config.num_train_timesteps:
        raise ValueError(f"--num_inference_steps {steps}: the pipeline was trained on "
                         f"{pipe.scheduler.config.num_train_timesteps} timesteps, the most it can take.")
    seeds = list(range(namespace.seed, namespace.seed + namespace.num_images))
    replaced = [seed for seed in seeds if namespace.output_dir
                and os.path.exists(os.path.join(namespace.output_dir, f"seed{seed:04d}.png"))]
    if replaced:  # the same seeds and settings draw the same images; other settings others
        print(f"Replacing {len(replaced)} image(s) of {namespace.output_dir} drawn before (seed{replaced[0]:04d}.png, "
              f"...).", file=sys.stderr)
    images = []
    for start in range(0, len(seeds), namespace.batch_size):
        batch = seeds[start:start + namespace.batch_size]
        if len(seeds) > namespace.batch_size:
            pipe.set_progress_bar_config(desc=f"Sampling images {start + 1}-{start + len(batch)} of {len(seeds)}")
        # One generator per image, seeded with its own seed: an image is the same whatever the batch it is drawn in.
        generators = [torch.Generator().manual_seed(seed) for seed in batch]
        batch_images = pipe(batch_size=len(batch), generator=generators, num_inference_steps=steps,
                            output_type="pil").images
        if namespace.output_dir:  # written as they come: a run stopped later keeps them
            for seed, image in zip(batch, batch_images):
                image.save(os.path.join(namespace.output_dir, f"seed{seed:04d}.png"))
        images.extend(batch_images if keep else [None] * len(batch_images))  # held for a grid only
    return images


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="Metrics of a trained model on a labelled folder.",
                                   description="Accuracy, macro F1, per-class recall and confusion matrix.")
    _add_model_args(parser)
    parser.add_argument("--data_dir", type=str, required=True, help="Labelled image folder.")
    parser.add_argument("--splits", type=str, nargs="+", default=None,
                        help="Splits to score (default: test if the folder has split folders with one, else all "
                             "images; with --image_list, all).")
    parser.add_argument("--image_list", type=str, default=None,
                        help="Score only the images this file lists, one per line, relative to --data_dir or "
                             "absolute: the test_images.txt a probe writes into its model folder (e.g. for the test "
                             "split it carved from a folder without one).")
    parser.add_argument("--output", type=str, default=None, help="JSON file to write (a confusion-matrix PNG beside).")
    parser.add_argument("--json", action="store_true", help="Print the whole report as JSON.")
    parser.set_defaults(func=evaluate)

    parser = subparsers.add_parser("predict", help="Class probabilities for image files and folders.",
                                   description="Print the class probabilities of each image.")
    parser.add_argument("images", nargs="+", help="Image files (JPEG, PNG, ..., DICOM, NIfTI: one prediction per "
                                                  "slice), or folders of them (searched recursively).")
    _add_model_args(parser)
    parser.add_argument("--json", action="store_true", help="Print JSON.")
    parser.set_defaults(func=predict)

    parser = subparsers.add_parser("generate", help="Generate images with a pretrained pipeline.",
                                   description="Generate images and save them as one PNG grid, or one PNG each.")
    parser.add_argument("--pretrained", type=str, required=True,
                        help="Pretrained pipeline folder, or a Hub repository id of one.")
    parser.add_argument("--revision", type=str, default=None,
                        help="The revision (branch, tag or commit) of --pretrained when it is a Hub repository id "
                             "(default: main).")
    parser.add_argument("--num_images", type=int, default=16, help="How many images.")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="Images sampled at once (the same images whatever the batch size; more take more memory).")
    parser.add_argument("--scheduler", type=str, default="ddpm", choices=["ddpm", "ddim"],
                        help="ddpm (the pipeline's own, as in the paper) or ddim (good with ~50 steps, 20x faster).")
    parser.add_argument("--num_inference_steps", type=int, default=None,
                        help="Denoising steps (default: 1000 for ddpm, 50 for ddim).")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=MIXED_PRECISION_CHOICES,
                        help="'bf16' runs the UNet in bf16.")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seed of the first image; image i is drawn with seed + i, so any one of them can be "
                             "drawn again alone (--seed 37 --num_images 1).")
    parser.add_argument("--output", type=str, default=None,
                        help="Image file to write: one grid (PNG; the extension chooses the format). Default: "
                             "samples.png, or no grid when --output_dir is given.")
    parser.add_argument("--output_dir", type=str, default=None,
                        help="Folder to write each image into as its own PNG, named by its seed (seed0000.png, ...), "
                             "as each batch is done.")
    parser.set_defaults(func=generate)
