"""The `mic-diffrep` command: one subcommand per step of the method.

    mic-diffrep run                                    # the whole method on the bundled MRI sample
    mic-diffrep pretrain --train_data_dir DIR --output_dir runs/pretrain
    mic-diffrep extract --pretrained runs/pretrain --data_dir DIR --output features.safetensors
    mic-diffrep probe --pretrained runs/pretrain --data_dir DIR --output_dir runs/model
    mic-diffrep evaluate --model runs/model --data_dir DIR
    mic-diffrep predict --model runs/model slice.jpg more_slices/
    mic-diffrep generate --pretrained runs/pretrain --output samples.png
    mic-diffrep check-leakage --train DIR --test DIR   (or --within DIR)
    mic-diffrep demo --model runs/model                # a Gradio page: upload a slice, see the prediction

`mic-diffrep SUBCOMMAND --help` explains every flag and shows its default. Each subcommand turns its flags into
settings and makes one library call; bad input ends with one line naming the file or setting, and exit code 2.
"""

import argparse
from typing import List, Optional

from transformers import HfArgumentParser

from . import check_leakage, demo, extract, inference, pretrain, probe, run
from .base import HelpFormatter, configure_logging, run_guarded, unrecognized
from .run import RUN_DEFAULTS, RUN_PRESETS, SAMPLE_DATA_DIR


class SubcommandParser(HfArgumentParser):
    """A subcommand's parser: every `--flag_name` also answers to `--flag-name`, as the flags `HfArgumentParser`
    makes from settings dataclasses (`pretrain`, `extract`, `probe`) do."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        dashed = [name.replace("_", "-") for name in names if name.startswith("--") and "_" in name]
        return super().add_argument(*names, *(name for name in dashed if name not in names), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mic-diffrep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND",
                                       parser_class=SubcommandParser)
    for module in (run, pretrain, extract, probe, inference, check_leakage, demo):
        module.register(subparsers)
    parser.subcommands = subparsers.choices
    return parser


def main(argv: Optional[List[str]] = None):
    """Runs a subcommand; returns what it returns (a summary, results, predictions), for use from Python."""
    configure_logging()
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the subcommand, with its usage (the top-level parser's said "mic-diffrep SUBCOMMAND ...")
        command = parser.subcommands[namespace.command]
        command.error(unrecognized(unknown, command))
    return run_guarded(f"mic-diffrep {namespace.command}", namespace.func, namespace)


def console_main() -> None:
    """The `mic-diffrep` executable: `main()`, exiting 0 on success. (The console-script wrapper calls
    `sys.exit(entry_point())`, which would print a returned summary and exit 1.)"""
    main()


__all__ = ["RUN_DEFAULTS", "RUN_PRESETS", "SAMPLE_DATA_DIR", "build_parser", "console_main", "main"]
