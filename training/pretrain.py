#!/usr/bin/env python
"""DDPM pretraining of a UNet2DModel on unlabelled medical images (MicDiffRep, step 1).

    accelerate launch training/pretrain.py --train_data_dir DATA_DIR --output_dir runs/pretrain

On one CPU machine with several processes (gloo DDP):

    torchrun --standalone --nproc_per_node 2 training/pretrain.py --train_data_dir DATA_DIR --output_dir OUT

`python training/pretrain.py --help` lists every flag with its default (the same flags as `mic-diffrep pretrain`).
"""

from mic_diffrep.commands.pretrain import main


if __name__ == "__main__":
    main()
