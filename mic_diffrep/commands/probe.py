"""`mic-diffrep probe` / `training/linear_probe.py`."""

from typing import Optional, Sequence

from ..probing import ProbeArguments, run_probe
from .base import script_main, settings_from


DESCRIPTION = ("Linear probing (SL sweep and MSFA) of a frozen model: results, plots, and a transformers model "
               "folder.")


def register(subparsers) -> None:
    parser = subparsers.add_parser("probe", dataclass_types=[ProbeArguments], description=DESCRIPTION,
                                   help="SL sweep + MSFA probing -> a transformers model folder (same flags as "
                                        "training/linear_probe.py).")
    parser.set_defaults(func=lambda namespace: run_probe(settings_from(ProbeArguments, namespace)))


def main(argv: Optional[Sequence[str]] = None):
    return script_main("training/linear_probe.py", ProbeArguments, run_probe, DESCRIPTION, argv)
