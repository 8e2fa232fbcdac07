"""What every subcommand shares: dataclass settings as flags, and one way of reporting bad input."""

import argparse
import dataclasses
import importlib
import logging
import sys
import warnings
from typing import Callable, List, Optional, Sequence, Type, TypeVar

import torch.distributed
from transformers import HfArgumentParser

from ..data import BadImageError
from ..utils import is_first_local_process, is_first_process


T = TypeVar("T")

# Errors that mean "bad input": one line naming the file or setting, exit code 2 (as argparse does for bad flags).
# Of the OSErrors, those of a path the user gave (their messages name it); others (a Hub server error, a full disk)
# keep their traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               FloatingPointError, BadImageError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`HfArgumentParser`'s formatter, which appends "(default: ...)" to every flag's help, but not to a help that
    states its default already, to a required flag, or as "(default: None)", which says nothing."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if action.required or action.default is None or "default" in help_text.lower():
            return help_text
        return super()._get_help_string(action)


class DeprecatedFlag(argparse.Action):
    """An old name of a flag, hidden from `--help`: it sets the new flag's value and warns that it will be removed.

    ```python
    >>> parser = argparse.ArgumentParser()
    >>> _ = parser.add_argument("--dataloader_num_workers", type=int, default=0)
    >>> _ = parser.add_argument("--num_workers", type=int, dest="dataloader_num_workers", action=DeprecatedFlag,
    ...                         new_flag="--dataloader_num_workers")
    >>> import warnings
    >>> with warnings.catch_warnings(record=True):
    ...     parser.parse_args(["--num_workers", "2"]).dataloader_num_workers
    2

    ```
    """

    def __init__(self, option_strings, dest, new_flag: str, help=argparse.SUPPRESS, **kwargs):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, help=help, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(f"{option_string} is deprecated and will be removed: use {self.new_flag}.", FutureWarning,
                      stacklevel=2)
        setattr(namespace, self.dest, values)


# What to give instead of a flag of diffusers' `train_unconditional.py`: for each, the flag a command must have for
# the hint to apply, and the hint (the first that applies to the command is given).
FOREIGN_FLAGS = {
    "--center_crop": [("--resize_mode", "--resize_mode center_crop")],
    "--random_flip": [("--no_random_flip", "nothing (random flips are on by default; --no_random_flip turns them "
                                           "off)")],
    "--dataset_name": [(flag, f"{flag} (a local image folder; Hub datasets are not downloaded)")
                       for flag in ("--train_data_dir", "--data_dir")],
}


def unrecognized(unknown: List[str], parser: Optional[argparse.ArgumentParser] = None) -> str:
    """argparse's "unrecognized arguments" message, with what to give instead of a flag of diffusers' scripts, among
    the flags `parser` (the command's) has.

    >>> unrecognized(["--center_crop", "--epochs", "3"])
    'unrecognized arguments: --center_crop --epochs 3 (here: --center_crop -> --resize_mode center_crop)'
    """
    known = parser._option_string_actions if parser is not None else None
    hints = []
    for flag in dict.fromkeys(arg.split("=")[0] for arg in unknown):
        hint = next((text for needed, text in FOREIGN_FLAGS.get(flag, []) if known is None or needed in known), None)
        if hint:
            hints.append(f"{flag} -> {hint}")
    return f"unrecognized arguments: {' '.join(unknown)}" + (f" (here: {'; '.join(hints)})" if hints else "")


def settings_from(cls: Type[T], namespace: argparse.Namespace) -> T:
    """The `cls` dataclass built from the parsed flags of its fields."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if f.init})


def log_level() -> int:
    """INFO on the first process of a machine; the other processes of a `torchrun` / `accelerate launch` run log
    errors only (as diffusers' training scripts set them), so each progress line and warning is printed once."""
    return logging.INFO if is_first_local_process() else logging.ERROR


def configure_logging() -> None:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=log_level())
    if not is_first_local_process():
        logging.captureWarnings(True)  # Python's warnings too: through logging, at its WARNING level, so not shown
        # the libraries' own loggers (their handlers, not the root's), as diffusers' training scripts quiet them
        for library in ("datasets", "diffusers", "transformers"):
            importlib.import_module(f"{library}.utils.logging").set_verbosity_error()


def _say(line: str) -> None:
    """One line to stderr in one write: the processes of a launch share the terminal, and `print`'s separate write
    of the newline let their lines run into each other."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run_guarded(prog: str, function: Callable, *args):
    """Runs `function(*args)`; bad input ends the program with one line, `PROG: error: MESSAGE`, and exit code 2; a
    training run stopped by Ctrl-C (its summary's `stop_reason` is `"interrupted"`), or any other work, with exit
    code 130 and one line (no traceback).

    A process group the run started (`torchrun`, `accelerate launch`) is destroyed before the program exits: left to
    interpreter shutdown, gloo's threads are torn down unjoined and a rank can abort ("terminate called without an
    active exception") after its work is done, which fails the whole launch.
    """
    try:
        result = function(*args)
        if isinstance(result, dict) and result.get("stop_reason") == "interrupted":
            # Ctrl-C saved a checkpoint and returned: a calling script still sees a run cut short (128 + SIGINT).
            if is_first_process():  # said once, not by every process of a launch
                _say(f"{prog}: interrupted; a checkpoint was saved: run the same command with "
                     f"--resume_from_checkpoint latest to continue")
            sys.exit(130)
        return result
    except USER_ERRORS as error:
        _say(f"{prog}: error: {error}")
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves a checkpoint and returns instead)
        _say(f"{prog}: interrupted")
        sys.exit(130)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def script_main(prog: str, settings_class: Type[T], function: Callable[[T], object], description: str,
                argv: Optional[Sequence[str]] = None):
    """The body of a `training/*.py` script: flags of `settings_class` -> settings -> `function(settings)`, with the
    same messages and exit codes as the `mic-diffrep` subcommand."""
    configure_logging()
    parser = HfArgumentParser(settings_class, prog=prog, description=description, formatter_class=HelpFormatter)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(unrecognized(unknown, parser))
    settings = run_guarded(prog, settings_from, settings_class, namespace)
    return run_guarded(prog, function, settings)
