#!/usr/bin/env python
"""Linear probing of a pretrained diffusion model: SL sweep, MSFA, evaluation, transformers model (MicDiffRep, step 3).

    accelerate launch training/linear_probe.py --pretrained runs/pretrain --data_dir DATA_DIR --output_dir runs/probe
"""

from mic_diffrep.commands.probe import main


if __name__ == "__main__":
    main()
