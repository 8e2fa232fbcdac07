"""`mic-diffrep pretrain` / `training/pretrain.py` and `training/pretrain_baseline.py`."""

from typing import Optional, Sequence

from ..training import BaselinePretrainingArguments, PretrainingArguments, pretrain, pretrain_baseline
from .base import script_main, settings_from


DESCRIPTION = "DDPM pretraining of a UNet2DModel on unlabelled medical images."
BASELINE_DESCRIPTION = "Pretraining of an MAE, MoCo v2 or BYOL baseline under the same rules."


def register(subparsers) -> None:
    parser = subparsers.add_parser("pretrain", dataclass_types=[PretrainingArguments], description=DESCRIPTION,
                                   help="DDPM pretraining (same flags as training/pretrain.py).")
    parser.set_defaults(func=lambda namespace: pretrain(settings_from(PretrainingArguments, namespace)))


def main(argv: Optional[Sequence[str]] = None):
    return script_main("training/pretrain.py", PretrainingArguments, pretrain, DESCRIPTION, argv)


def baseline_main(argv: Optional[Sequence[str]] = None):
    return script_main("training/pretrain_baseline.py", BaselinePretrainingArguments, pretrain_baseline,
                       BASELINE_DESCRIPTION, argv)
