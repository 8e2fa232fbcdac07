#!/usr/bin/env python
"""Pretraining of a self-supervised baseline (MAE, MoCo v2 or BYOL) for the paper's Table 1 comparison.

    accelerate launch training/pretrain_baseline.py --method byol --train_data_dir DATA_DIR --output_dir runs/byol \
        --max_train_steps 3000 --mixed_precision bf16
"""

from mic_diffrep.commands.pretrain import baseline_main


if __name__ == "__main__":
    baseline_main()
