"""The pretraining dataset: decoded images in a seeded per-epoch order with seeded horizontal flips."""

from typing import Dict

import torch

from ..models.mic_diffrep.preprocessing import pixels_to_model_input
from ..models.mic_diffrep.unet_features import seed_for


class PretrainingDataset(torch.utils.data.Dataset):
    """Decoded images in a seeded per-epoch order with seeded horizontal flips.

    Order and flips depend only on `(seed, epoch)`, so a run resumed in the middle of an epoch sees exactly the
    batches an uninterrupted run would. Call `shuffle_for_epoch` before iterating (not named `set_epoch`: accelerate's loaders call that with their own
    iteration count, which restarts at 0 after a resume); use a sequential sampler (the
    shuffling is done here) so that `accelerate` can shard whole batches across processes.
    """

    def __init__(self, pixels: torch.Tensor, seed: int = 0, random_flip: bool = True):
        self.pixels = pixels
        self.seed = seed
        self.random_flip = random_flip
        self.shuffle_for_epoch(0)

    def shuffle_for_epoch(self, epoch: int) -> None:
        generator = torch.Generator().manual_seed(seed_for(self.seed, epoch))
        self.order = torch.randperm(len(self.pixels), generator=generator)
        self.flips = torch.rand(len(self.pixels), generator=generator) < 0.5

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        image = pixels_to_model_input(self.pixels[self.order[index]])
        if self.random_flip and self.flips[index]:
            image = image.flip(-1)
        return {"pixel_values": image, "index": self.order[index]}
