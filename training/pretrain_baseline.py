#!/usr/bin/env python
"""Pretraining of a self-supervised baseline (MAE, MoCo v2 or BYOL) for the paper's Table 1 comparison.

    accelerate launch training/pretrain_baseline.py --method byol --train_data_dir DIR --output_dir runs/byol \
        --time_budget_minutes 30 --mixed_precision bf16
"""

import logging

from mic_diffrep.baseline_pretraining import main, parse_args


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    main(parse_args())
