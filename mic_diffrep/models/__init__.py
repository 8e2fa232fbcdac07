"""The models: MicDiffRep (`models/mic_diffrep/`: the transformers classifier, its image processor, and the UNet
pieces it needs) and the self-supervised baselines it is compared with (`models/baselines/`)."""
