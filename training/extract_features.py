#!/usr/bin/env python
"""Extract diffusion features of an image folder into a feature cache (MicDiffRep, step 2).

    accelerate launch training/extract_features.py --pretrained runs/pretrain --data_dir DIR --output feats.safetensors
    torchrun --standalone --nproc_per_node 2 training/extract_features.py ...   # 2 CPU processes (gloo)
"""

import logging

from mic_diffrep.feature_extraction import main, parse_args


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    main(parse_args())
