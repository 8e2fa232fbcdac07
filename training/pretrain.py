#!/usr/bin/env python
"""DDPM pretraining of a UNet2DModel on unlabelled medical images (MicDiffRep, step 1).

    accelerate launch training/pretrain.py --train_data_dir ../shared/data/brain-tumor-mri --output_dir runs/pretrain

On one CPU machine with several processes (gloo DDP):

    torchrun --standalone --nproc_per_node 2 training/pretrain.py --train_data_dir DIR --output_dir OUT
"""

from mic_diffrep.pretraining import main, parse_args


if __name__ == "__main__":
    main(parse_args())
