"""The `mic-diffrep` command: one subcommand per step of the method.

    mic-diffrep run                                    # the whole method on the bundled MRI sample
    mic-diffrep pretrain --train_data_dir DIR --output_dir runs/pretrain
    mic-diffrep extract --pretrained runs/pretrain --data_dir DIR --output features.safetensors
    mic-diffrep probe --pretrained runs/pretrain --data_dir DIR --output_dir runs/model
    mic-diffrep evaluate --model runs/model --data_dir DIR
    mic-diffrep predict --model runs/model slice.jpg
    mic-diffrep generate --pretrained runs/pretrain --output samples.png
    mic-diffrep check-leakage --train DIR --test DIR   (or --within DIR)

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
    "use_ema": False,
    "num_samples": 16,
    "sampling_steps": 250,
    "timesteps": [10, 50, 100, 200, 300, 400, 500, 600],
    "pooling": "avg",
    "probe_epochs": 15,
    "probe_learning_rate": 0.01,
    "probe_batch_size": 128,
    "hidden_size": 512,
    "seed": 0,
}


def _pretrain(args: argparse.Namespace) -> None:
    from .pretraining import main

    main(args)


def _extract(args: argparse.Namespace) -> None:
    from .feature_extraction import main

    main(args)


def _probe(args: argparse.Namespace) -> None:
    from .linear_probe import main

    main(args)


def _evaluate(args: argparse.Namespace) -> None:
    from .inference import evaluate_folder
    from .plotting import plot_confusion_matrix

    report = evaluate_folder(args.model, args.data_dir, args.splits, args.batch_size, args.mixed_precision,
                             args.skip_bad_images)
    print(json.dumps({k: v for k, v in report.items() if k != "skipped_images"}, indent=2))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        png = os.path.splitext(args.output)[0] + "_confusion_matrix.png"
        plot_confusion_matrix(report["confusion_matrix"], list(report["per_class_recall"]), png,
                              title=f"{os.path.basename(os.path.abspath(args.model))} on {args.data_dir}")
        print(f"Wrote {args.output} and {png}")


def _predict(args: argparse.Namespace) -> None:
    from .inference import predict_files

    predictions = predict_files(args.model, args.images, args.batch_size, args.mixed_precision)
    if args.json:
        print(json.dumps(predictions, indent=2))
        return
    for prediction in predictions:
        ranked = sorted(prediction["probabilities"].items(), key=lambda item: -item[1])
        print(f"{prediction['file']}: " + ", ".join(f"{label} {p:.3f}" for label, p in ranked))


def _generate(args: argparse.Namespace) -> None:
    import torch
    from diffusers import DDIMScheduler

    from .feature_extraction import load_pipeline
    from .pipelines import save_image_grid
    from .utils import precision_dtype

    pipe = load_pipeline(args.pretrained)
    pipe.to(precision_dtype(args.mixed_precision))
    if args.scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    images = pipe(batch_size=args.num_images, generator=torch.Generator().manual_seed(args.seed),
                  num_inference_steps=args.num_inference_steps, output_type="np").images
    save_image_grid(images, args.output)
    print(f"Saved {args.num_images} samples to {args.output}")


def _check_leakage(args: argparse.Namespace) -> None:
    from .leakage import run_check

    run_check(args)


def run_config(args: argparse.Namespace) -> dict:
    """`RUN_DEFAULTS`, updated by `--config` and then by the flags given."""
    config = dict(RUN_DEFAULTS)
    if args.config:
        config.update(_load_config(args.config))
    config.update({k: v for k, v in vars(args).items() if v is not None and k in RUN_DEFAULTS})
    return config


def _run(args: argparse.Namespace) -> dict:
    """The whole method: pretrain -> sample grid -> features -> SL sweep + MSFA -> evaluation -> model -> report."""
    from .linear_probe import add_probe_args, main as probe
    from .pretraining import add_pretraining_args, main as pretrain

    config = run_config(args)
    output_dir = config["output_dir"]
    pretrain_dir, model_dir = os.path.join(output_dir, "pretrain"), os.path.join(output_dir, "model")
    epochs = str(config["pretrain_epochs"])
    pretrain_argv = [
        "--train_data_dir", config["data_dir"], "--output_dir", pretrain_dir,
        "--resolution", str(config["resolution"]), "--model_config_name_or_path", config["model_config_name_or_path"],
        "--num_epochs", epochs, "--train_batch_size", str(config["pretrain_batch_size"]),
        "--learning_rate", str(config["learning_rate"]), "--mixed_precision", config["mixed_precision"],
        "--save_images_epochs", epochs, "--save_model_epochs", epochs, "--checkpointing_steps", "1000000",
        "--eval_batch_size", str(config["num_samples"]), "--ddpm_num_inference_steps", str(config["sampling_steps"]),
        "--seed", str(config["seed"]), "--logger", "tensorboard",
    ] + (["--use_ema"] if config["use_ema"] else [])
    print("[1/2] Pretraining: mic-diffrep pretrain " + " ".join(pretrain_argv), flush=True)
    pretraining = pretrain(add_pretraining_args(argparse.ArgumentParser()).parse_args(pretrain_argv))

    probe_argv = [
        "--pretrained", pretrain_dir, "--data_dir", config["data_dir"], "--output_dir", model_dir,
        "--timesteps", *map(str, config["timesteps"]), "--pooling", config["pooling"],
        "--num_epochs", str(config["probe_epochs"]), "--learning_rate", str(config["probe_learning_rate"]),
        "--train_batch_size", str(config["probe_batch_size"]), "--hidden_size", str(config["hidden_size"]),
        "--mixed_precision", config["mixed_precision"], "--seed", str(config["seed"]),
    ]
    print("[2/2] Linear probing: mic-diffrep probe " + " ".join(probe_argv), flush=True)
    results = probe(add_probe_args(argparse.ArgumentParser()).parse_args(probe_argv))

    samples = sorted(os.listdir(os.path.join(pretrain_dir, "samples")))
    report = {"command": "mic-diffrep " + " ".join(sys.argv[1:]) if sys.argv else None, "config": config,
              "pretraining": pretraining, "probe": results,
              "files": {"pipeline": pretrain_dir, "model": model_dir,
                        "sample_grid": os.path.join(pretrain_dir, "samples", samples[-1]),
                        "accuracy_vs_timestep": os.path.join(model_dir, "accuracy_vs_timestep.png"),
                        "confusion_matrix": os.path.join(model_dir, "confusion_matrix.png")}}
    with open(os.path.join(output_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(_report_markdown(report))
    msfa, sl = results["msfa"]["test"]["all"], results["sl_best"]["test"]["all"]
    print(f"\nMicDiffRep-MS test accuracy {msfa['accuracy']:.3f} (macro F1 {msfa['macro_f1']:.3f}); "
          f"SL-best {sl['accuracy']:.3f} ({results['sl_best']['layer']}, t={results['sl_best']['timestep']}).")
    print(f"Report: {os.path.join(output_dir, 'report.md')}\nModel: {model_dir}  (mic-diffrep predict --model "
          f"{model_dir} IMAGE)")
    return report


def _report_markdown(report: dict) -> str:
    from .linear_probe import results_markdown

    pre, files = report["pretraining"], report["files"]
    rel = {k: os.path.relpath(v, report["config"]["output_dir"]) for k, v in files.items()}
    lines = [
        "# mic-diffrep run", "",
        f"Command: `{report['command']}`", "",
        "## Pretraining", "",
        f"{pre['num_images']} images ({', '.join(pre['splits'])}) of `{pre['train_data_dir']}` at {pre['resolution']} px, "
        f"{pre['num_parameters'] / 1e6:.2f}M-parameter UNet, {pre['global_step']} steps in {pre['train_minutes']:.1f} "
        f"minutes ({pre['images_per_second']:.1f} images/s, {pre['mixed_precision']}), final loss {pre['final_loss']:.4f}.",
        "", f"![samples]({rel['sample_grid']})", "",
        "## Linear probing", "",
        results_markdown(report["probe"]).split("\n", 2)[2],
        f"![accuracy vs timestep]({rel['accuracy_vs_timestep']})", "",
        f"![confusion matrix]({rel['confusion_matrix']})", "",
    ]
    return "\n".join(lines)


def _load_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path!r} does not exist.")
    with open(path, encoding="utf-8") as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            config = yaml.safe_load(f) or {}
        else:
            config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings, got {type(config).__name__}.")
    unknown = sorted(set(config) - set(RUN_DEFAULTS))
    if unknown:
        raise ValueError(f"--config {path}: unknown key(s) {unknown}; known keys are {sorted(RUN_DEFAULTS)}.")
    return config


def build_parser() -> argparse.ArgumentParser:
    from .feature_extraction import add_extraction_args
    from .leakage import add_leakage_args
    from .linear_probe import add_probe_args
    from .pretraining import add_pretraining_args
    from .utils import MIXED_PRECISION_CHOICES

    parser = argparse.ArgumentParser(prog="mic-diffrep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    run = subparsers.add_parser(
        "run", help="The whole method on a dataset (default: the bundled MRI sample).",
        description="Pretrain -> sample grid -> features -> SL sweep + MSFA -> evaluation -> transformers model with "
                    "a model card -> report (Markdown, JSON, PNGs). Settings come from RUN_DEFAULTS, then --config, "
                    "then the flags.")
    run.add_argument("--data_dir", type=str, default=None,
                     help="Labelled image folder (Training/Testing/<class>/ or train/val/test layouts, or class "
                          "folders). Default: the bundled sample of the Brain Tumor MRI dataset.")
    run.add_argument("--output_dir", type=str, default=None, help="Where everything goes (default runs/mic-diffrep).")
    run.add_argument("--config", type=str, default=None,
                     help=f"YAML/JSON preset with any of the keys {sorted(RUN_DEFAULTS)}; flags override it.")
    run.add_argument("--resolution", type=int, default=None, help="Image size (default 64).")
    run.add_argument("--model_config_name_or_path", type=str, default=None,
                     help="UNet preset or config (default 'default', 4.3M parameters).")
    run.add_argument("--mixed_precision", type=str, default=None, choices=MIXED_PRECISION_CHOICES,
                     help="Precision of pretraining, sampling and feature extraction (default bf16).")
    run.add_argument("--pretrain_epochs", type=int, default=None, help="Pretraining epochs (default 40).")
    run.add_argument("--pretrain_batch_size", type=int, default=None, help="Pretraining batch size (default 32).")
    run.add_argument("--learning_rate", type=float, default=None, help="Pretraining learning rate (default 1e-4).")
    run.add_argument("--use_ema", action="store_const", const=True, default=None,
                     help="Pretrain with an EMA of the weights and use it.")
    run.add_argument("--num_samples", type=int, default=None, help="Images in the sample grid (default 16).")
    run.add_argument("--sampling_steps", type=int, default=None, help="DDPM steps for the sample grid (default 250).")
    run.add_argument("--timesteps", type=int, nargs="+", default=None,
                     help="Timesteps of the probe sweep (default 10 50 100 200 300 400 500 600).")
    run.add_argument("--pooling", type=str, default=None, choices=["avg", "avgmax", "grid"], help="Feature pooling.")
    run.add_argument("--probe_epochs", type=int, default=None, help="Probe epochs (default 15).")
    run.add_argument("--probe_learning_rate", type=float, default=None, help="Probe learning rate (default 0.01).")
    run.add_argument("--probe_batch_size", type=int, default=None, help="Probe batch size (default 128).")
    run.add_argument("--hidden_size", type=int, default=None, help="MSFA hidden size (default 512).")
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

    probe = subparsers.add_parser("probe", help="SL sweep + MSFA probing -> a transformers model folder "
                                                "(same flags as training/linear_probe.py).",
                                  description="Linear probing (SL sweep and MSFA) of a pretrained diffusion model.")
    add_probe_args(probe)
    probe.set_defaults(func=_probe)

    evaluate = subparsers.add_parser("evaluate", help="Metrics of a trained model on a labelled folder.",
                                     description="Accuracy, macro F1, per-class recall and confusion matrix.")
    _add_inference_args(evaluate)
    evaluate.add_argument("--data_dir", type=str, required=True, help="Labelled image folder.")
    evaluate.add_argument("--splits", type=str, nargs="+", default=None,
                          help="Splits to score (default: test if present, else all images).")
    evaluate.add_argument("--output", type=str, default=None, help="JSON file to write (a confusion-matrix PNG beside).")
    evaluate.add_argument("--skip_bad_images", action="store_true", help="Skip unreadable images instead of failing.")
    evaluate.set_defaults(func=_evaluate)

    predict = subparsers.add_parser("predict", help="Class probabilities for image files.",
                                    description="Print the class probabilities of each image.")
    predict.add_argument("images", nargs="+", help="Image files.")
    _add_inference_args(predict)
    predict.add_argument("--json", action="store_true", help="Print JSON.")
    predict.set_defaults(func=_predict)

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

    leakage = subparsers.add_parser("check-leakage", help="Exact and near-duplicate images across or within folders.",
                                    description="Find test images with a near-identical training image (--train, "
                                                "--test), or duplicate groups within one folder (--within).")
    add_leakage_args(leakage)
    leakage.set_defaults(func=_check_leakage)
    return parser


def _add_inference_args(parser: argparse.ArgumentParser) -> None:
    """The flags `evaluate` and `predict` share: the model folder and how it runs."""
    from .utils import MIXED_PRECISION_CHOICES

    parser.add_argument("--model", type=str, required=True, help="Model folder (from probe or run).")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per forward.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=MIXED_PRECISION_CHOICES,
                        help="'bf16' autocasts the UNet.")


def main(argv: Optional[List[str]] = None) -> None:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"mic-diffrep {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
