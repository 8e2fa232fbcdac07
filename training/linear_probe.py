#!/usr/bin/env python
"""Linear probing of a pretrained diffusion model: SL sweep, MSFA, evaluation, transformers model (MicDiffRep, step 3).

    accelerate launch training/linear_probe.py --pretrained runs/pretrain \
        --data_dir ../shared/data/brain-tumor-mri --output_dir runs/probe
"""

import logging

from mic_diffrep.linear_probe import main, parse_args


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    main(parse_args())
