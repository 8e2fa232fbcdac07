"""`mic-diffrep extract` / `training/extract_features.py`."""

from typing import Optional, Sequence

from ..features import ExtractionArguments, extract_folder
from .base import script_main, settings_from


DESCRIPTION = "Extract pooled features (UNet blocks, or a baseline's encoder) of an image folder into a cache file."


def register(subparsers) -> None:
    parser = subparsers.add_parser("extract", dataclass_types=[ExtractionArguments], description=DESCRIPTION,
                                   help="Extract features of an image folder into a cache file.")
    parser.set_defaults(func=lambda namespace: extract_folder(settings_from(ExtractionArguments, namespace)))


def main(argv: Optional[Sequence[str]] = None):
    return script_main("training/extract_features.py", ExtractionArguments, extract_folder, DESCRIPTION, argv)
