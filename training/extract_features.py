#!/usr/bin/env python
"""Extract features of an image folder into a feature cache (MicDiffRep, step 2).

    accelerate launch training/extract_features.py --pretrained runs/pretrain --data_dir DATA_DIR --output feats.safetensors
    torchrun --standalone --nproc_per_node 2 training/extract_features.py ...   # 2 CPU processes (gloo)
"""

from mic_diffrep.commands.extract import main


if __name__ == "__main__":
    main()
